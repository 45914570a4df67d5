"""Probes: hooks and interceptors that turn torch activity into device tensors.

Each public module covers one signal family with one :class:`~otel_llm.probes.base.Probe`
subclass; :mod:`~otel_llm.probes.registry` builds them, :mod:`~otel_llm.probes.interception`
patches the torch and transformers functions they listen to, and ``_``-prefixed modules
are their private helpers. Probes only bookkeep on non-sampled steps, never synchronise
host and device, and hand their device tensors to the session at the end of a sampled step.
"""
