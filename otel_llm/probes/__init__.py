"""Probes: hooks and interceptors that turn torch activity into device tensors.

Each module covers one signal family. Probes only bookkeep on non-sampled
steps, never synchronise host and device, and hand their device tensors to the
session at the end of a sampled step.
"""
