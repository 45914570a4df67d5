"""The instrumentation session: step clock, probes and publishing for one training run.

A step is the span between two optimizer steps. Whether step t is sampled is
known before its forward pass; on a sampled step the probes keep device
tensors, and the optimizer post-step hook publishes them with one transfer.
Non-sampled steps cost a few Python attribute reads per hook.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from otel_llm import _fork
from otel_llm._termination import install_sigterm_handler
from otel_llm.anomaly import AnomalyMonitor
from otel_llm.catalog import (
    ANOMALY_EVENTS,
    ATTR_DEVICE,
    ATTR_PARAM_GROUP,
    KV_CACHE_HIT_RATIO,
    KV_CACHE_HITS,
    KV_CACHE_LOOKUPS,
    LOGITS_Z_LOSS,
    LOSS_TOKEN,
    LOSS_TOKEN_SKEWNESS,
    MEMORY_PRESSURE,
    PARAM_UPDATE_RATIO,
    PARAM_UPDATE_VARIANCE_RATIO,
    TELEMETRY_SAMPLING_INTERVAL,
    TRAIN_LEARNING_RATE,
    TRAIN_LOSS,
    MetricSpec,
    prometheus_name,
)
from otel_llm.config import Config
from otel_llm.instruments import Publisher, create_instrument
from otel_llm.probes import cross_entropy, kv_cache
from otel_llm.probes.base import ModelProbe, StepValues, log_failure
from otel_llm.probes.loss import LossProbe
from otel_llm.probes.memory import memory_pressure
from otel_llm.probes.optimizer import OptimizerProbe, trainable_params
from otel_llm.probes.registry import build_model_probes
from otel_llm.probes.tokens import TokenCounter
from otel_llm.probes.update_sample import CoordinateSample
from otel_llm.provider import ProviderBundle, build_provider
from otel_llm.sampler import SamplingInputs, make_sampler
from otel_llm.sampling_agreement import agreed_inputs
from otel_llm.schema import builtin_names, load_schema, validate_spec
from otel_llm.snapshot import GaugePoints, Publication, to_host
from otel_llm.version import __version__

__all__ = ["Instrumentation", "active", "check_types"]

_logger = logging.getLogger(__name__)

_LOSS_FAMILY = (TRAIN_LOSS, LOSS_TOKEN, LOSS_TOKEN_SKEWNESS, LOGITS_Z_LOSS)
_UPDATE_FAMILY = (PARAM_UPDATE_RATIO, PARAM_UPDATE_VARIANCE_RATIO)
_KV_CACHE_FAMILY = (KV_CACHE_HIT_RATIO, KV_CACHE_HITS, KV_CACHE_LOOKUPS)
_TOKENS_KEY = "#tokens"
_DECISION_KEY = "#sampling"

_sessions: weakref.WeakSet[Instrumentation] = weakref.WeakSet()


def active() -> Instrumentation | None:
    """The most recently started session that is still running."""
    live = [s for s in _sessions if not s.closed]
    return max(live, key=lambda s: s._started) if live else None


def _shutdown_all() -> None:
    for session in list(_sessions):
        session.shutdown()


atexit.register(_shutdown_all)


def _anomaly_monitor(config: Config) -> AnomalyMonitor | None:
    """The SAX detector the config asks for; schedule- and memory-driven gauges are not judged."""
    if not config.anomaly_detection or config.is_disabled(ANOMALY_EVENTS):
        return None
    return AnomalyMonitor(baseline=config.anomaly_baseline, window=config.anomaly_window,
                          segments=config.anomaly_segments, alphabet=config.anomaly_alphabet,
                          threshold=config.anomaly_threshold,
                          ignored=(TRAIN_LEARNING_RATE, MEMORY_PRESSURE, TELEMETRY_SAMPLING_INTERVAL))


def check_types(model: object, optimizer: object) -> None:
    """ValueError unless model/optimizer are None or a torch Module/Optimizer."""
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")


class Instrumentation:
    """A running otel_llm session; returned by :func:`otel_llm.instrument`.

    Use it as a context manager or call :meth:`shutdown`. Hooks never raise into
    the training loop: a failing probe is logged once and skipped for the step.
    """

    def __init__(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
                 config: Config | None = None, meter_provider: MeterProvider | None = None,
                 bundle: ProviderBundle | None = None, extra_readers: Iterable[MetricReader] = ()) -> None:
        check_types(model, optimizer)
        self.config = config if config is not None else Config()
        schema = load_schema(self.config.schema_path) if self.config.schema_path else ()
        if bundle is not None:
            self._bundle, self._owns_provider = bundle, True
        elif meter_provider is not None:
            self._bundle, self._owns_provider = ProviderBundle(meter_provider), False  # type: ignore[arg-type]
        else:
            self._bundle, self._owns_provider = build_provider(self.config, schema, extra_readers), True
        meter = self._bundle.provider.get_meter("otel_llm", __version__)
        self._meter = meter
        self._publisher = Publisher(meter, _anomaly_monitor(self.config))
        self._custom: dict[str, tuple[MetricSpec, Any]] = {}
        for spec in schema:
            self._custom[spec.name] = (spec, create_instrument(meter, spec))

        cfg = self.config
        self._sampler = make_sampler(cfg)
        self._want_loss = not all(cfg.is_disabled(n) for n in _LOSS_FAMILY)
        self._loss = LossProbe(cfg.token_loss_samples, seed=cfg.update_sample_seed)
        sample = CoordinateSample(cfg.update_sample_size, cfg.update_sample_seed)
        self._optim = OptimizerProbe(cfg.grad_sparsity_threshold, sample,
                                     updates=not all(cfg.is_disabled(n) for n in _UPDATE_FAMILY))
        self._tokens = TokenCounter()
        self._model_probes: list[ModelProbe] = build_model_probes(cfg)
        self._handles: list[RemovableHandle] = []
        self._optimizer: weakref.ref[torch.optim.Optimizer] | None = None
        self._gradients_read_externally = False
        self._step = 0
        self._sampled = False
        self._set_sampled(self._sampler.is_sampled(0))
        self._last_step_end: float | None = None
        self._overhead = 0.0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.closed = False

        if self._want_loss:
            cross_entropy.add_listener(self._on_cross_entropy)
        if not all(cfg.is_disabled(n) for n in _KV_CACHE_FAMILY):
            kv_cache.add_listener(self._on_kv_cache)
        if optimizer is not None:
            self._adopt(optimizer)
            self._handles.append(optimizer.register_step_pre_hook(self._on_pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._on_post_step))
        else:
            self._handles.append(register_optimizer_step_pre_hook(self._on_pre_step))
            self._handles.append(register_optimizer_step_post_hook(self._on_post_step))
        self._model_resolved = False
        if model is not None:
            self._attach_model(model)
        else:
            self._tokens.discover()
        _sessions.add(self)
        install_sigterm_handler(_shutdown_all, self.config.shutdown_timeout)

    # -- public surface ---------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps seen so far."""
        return self._step

    @property
    def sampled(self) -> bool:
        """Whether the current step computes the expensive signals (known before its forward pass)."""
        return self._sampled

    @property
    def sampling_interval(self) -> int:
        """Steps between sampled steps as the sampling policy sets it now (1 during adaptive warm-up)."""
        return self._sampler.interval

    @property
    def meter_provider(self) -> MeterProvider:
        return self._bundle.provider

    @property
    def prometheus_url(self) -> str | None:
        """The scrape URL of this session's Prometheus endpoint, if it serves one."""
        return self._bundle.prometheus_url

    def attach(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Point an existing session at a model/optimizer (e.g. an explicit call under zero-code)."""
        if model is not None and self._tokens.model is None:
            self._attach_model(model)
        if optimizer is not None:
            if self._optimizer is None:
                self._adopt(optimizer)
            elif self._optimizer() is not optimizer:
                _logger.warning("otel_llm: already following another optimizer; ignoring the new one")

    def record_loss(self, loss: float | torch.Tensor) -> None:
        """Report the step's training loss from a custom loop (overrides the intercepted loss)."""
        if self._sampled and not self.closed:
            self._loss.record_manual_loss(loss)

    def record_kv_cache(self, reused: int, added: int) -> None:
        """Report one KV-cache update: ``reused`` entries served from cache, ``added`` newly computed."""
        self._publisher.record_kv_cache(int(reused), int(added))

    def read_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Read the step's gradients now; from then on the optimizer's pre-step hook leaves them alone.

        For loops that run forward and backward inside ``optimizer.step(closure)``
        (Lightning): the pre-step hook fires before the closure, when the step's
        gradients do not exist yet. Call this where they are final, before the update.
        """
        self._gradients_read_externally = True
        self._pre_step(optimizer)

    def register(self, name: str, instrument: str, *, unit: str = "1", description: str = "",
                 attributes: Iterable[str] = (), buckets: Iterable[float] | None = None) -> MetricSpec:
        """Declare a custom metric at run time (same rules as the schema file); returns its spec."""
        raw: dict[str, Any] = {"name": name, "instrument": instrument, "unit": unit,
                               "description": description, "attributes": list(attributes)}
        if buckets is not None:
            raw["buckets"] = list(buckets)
        taken = builtin_names()
        taken.update({n: prometheus_name(s.name, s.unit, s.instrument) for n, (s, _) in self._custom.items()})
        spec = validate_spec(raw, source="register()", entry=repr(name), taken=taken)
        self._custom[spec.name] = (spec, create_instrument(self._meter, spec))
        return spec

    def record(self, name: str, value: float, attributes: Mapping[str, str] | None = None) -> None:
        """Record a value of a schema-declared or registered metric; NaN/Inf are counted, not sent.

        Attribute keys the metric does not declare are dropped, as its View drops them.
        """
        if _fork.forked:  # a forked worker never exports; recording could wait on a lock copied mid-use
            return
        entry = self._custom.get(name)
        if entry is None:
            raise ValueError(f"unknown custom metric {name!r}: declare it in OTEL_LLM_SCHEMA or register() it")
        spec, instrument = entry
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            self._publisher.count_nonfinite(name)
            return
        attrs = {key: value for key, value in (attributes or {}).items() if key in spec.attributes}
        if spec.instrument == "counter":
            if value < 0:
                raise ValueError(f"{name} is a counter; it cannot decrease by {value}")
            instrument.add(value, attrs)
        elif spec.instrument == "up_down_counter":
            instrument.add(value, attrs)
        elif spec.instrument == "histogram":
            if value < 0:
                raise ValueError(f"{name} is a histogram; negative values are not representable")
            instrument.record(value, attrs)
        else:
            instrument.set(value, attrs)

    def flush(self, timeout: float | None = None) -> bool:
        """Publish pending token counts and push OTLP now; bounded by ``timeout`` (default: config)."""
        limit = self.config.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._lock:
            self._submit_counts(steps=0, durations=[])
        drained = self._publisher.drain(max(0.0, deadline - time.monotonic()))
        if not self._owns_provider:
            return drained
        return self._bundle.flush(max(0.05, deadline - time.monotonic())) and drained

    def shutdown(self) -> None:
        """Remove every hook, publish what is pending and close the exporters; idempotent and bounded."""
        if self.closed:
            return
        self.closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tokens.detach()
        for probe in self._model_probes:
            probe.detach()
        cross_entropy.remove_listener(self._on_cross_entropy)
        kv_cache.remove_listener(self._on_kv_cache)
        if _fork.forked:
            return
        deadline = time.monotonic() + self.config.shutdown_timeout
        with self._lock:
            self._submit_counts(steps=0, durations=[])
        self._publisher.close(max(0.0, deadline - time.monotonic()) / 2)
        if self._owns_provider:
            self._bundle.shutdown(max(0.05, deadline - time.monotonic()))

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- hooks ------------------------------------------------------------------
    def _on_cross_entropy(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: torch.Tensor) -> None:
        if not self._sampled or _fork.forked:
            return
        try:
            input, target, options = cross_entropy.bind(*args, **kwargs)
        except TypeError:  # a call shape the original accepted but we cannot read: not ours to judge
            return
        if not isinstance(input, torch.Tensor) or not input.requires_grad:
            return
        timed = not torch.compiler.is_compiling()  # a clock read is a graph break under torch.compile
        started = time.perf_counter() if timed else 0.0
        try:
            self._loss.on_call(input, target, options, result)
        except Exception:  # noqa: BLE001 - never raise into the training loop
            log_failure("loss")
            self._loss.reset()
        if timed:
            self._overhead += time.perf_counter() - started

    def _attach_model(self, model: torch.nn.Module) -> None:
        """Count tokens on ``model`` and let every model probe hook it."""
        self._model_resolved = True
        self._tokens.attach(model)
        families: dict[str, list[torch.Tensor]] = {}
        for probe in self._model_probes:
            try:
                probe.attach(model)
                probe.begin_step(self._sampled)
                families.update(probe.param_families())
            except Exception:  # noqa: BLE001 - an unfamiliar model must not stop training
                log_failure(probe.name)
                probe.detach()
        self._optim.set_families(families)

    def _on_kv_cache(self, reused: int, added: int) -> None:
        if not _fork.forked:
            self._publisher.record_kv_cache(reused, added)

    def _set_sampled(self, sampled: bool) -> None:
        self._sampled = sampled
        for probe in self._model_probes:
            probe.begin_step(sampled)

    def _adopt(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)

    def _resolve_model(self, optimizer: torch.optim.Optimizer) -> None:
        """At the first step, keep token counting on the model that owns the optimizer's parameters."""
        self._model_resolved = True
        model = self._tokens.adopt(trainable_params(optimizer))
        if model is not None:
            self._attach_model(model)
        else:
            _logger.info("otel_llm: no model owning the optimizer's parameters was seen; token counts and "
                         "model signals need instrument(model=...)")

    def _owns(self, optimizer: torch.optim.Optimizer) -> bool:
        if self._optimizer is None:
            self._adopt(optimizer)
            return True
        return self._optimizer() is optimizer

    def _on_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._gradients_read_externally:
            self._pre_step(optimizer)

    def _pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        if _fork.forked or self.closed or not self._owns(optimizer):
            return
        if not self._model_resolved:
            self._resolve_model(optimizer)
        next_sampled = self._sampler.is_sampled(self._step + 1)
        if not (self._sampled or next_sampled):
            return
        started = time.perf_counter()
        try:
            self._optim.pre_step(optimizer, self._step, self._sampled, next_sampled)
        except Exception:  # noqa: BLE001
            log_failure("optimizer")
            self._optim.reset()
        self._overhead += time.perf_counter() - started

    def _on_post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if _fork.forked or self._optimizer is None or self._optimizer() is not optimizer:
            return
        now = time.perf_counter()
        with self._lock:
            durations = [now - self._last_step_end] if self._last_step_end is not None else []
            if self._sampled:
                self._publish(self._collect(optimizer), durations, started=now)
            else:
                self._submit_counts(steps=1, durations=durations)
            self._step += 1
            self._set_sampled(self._sampler.is_sampled(self._step))
            self._overhead = 0.0
            self._last_step_end = time.perf_counter()

    # -- publishing -------------------------------------------------------------
    def _submit_counts(self, steps: int, durations: list[float]) -> None:
        """Counters of a non-sampled step: a queue put; device token counts are read off-thread."""
        host_tokens, device_tokens = self._tokens.take()
        if steps or durations or host_tokens or device_tokens is not None:
            self._publisher.submit(Publication(step=self._step, sampled=False, steps=steps, tokens=host_tokens,
                                               device_tokens=device_tokens, durations=durations))

    def _collect(self, optimizer: torch.optim.Optimizer) -> StepValues:
        """Every probe's device values of the sampled step; a failing probe contributes nothing."""
        values = StepValues()
        sources: list[tuple[str, Callable[[], StepValues], Callable[[], None]]] = [
            ("optimizer", lambda: self._optim.post_step(optimizer), self._optim.reset),
            ("loss", self._loss.finish, self._loss.reset),
            *((probe.name, probe.finish, probe.reset) for probe in self._model_probes),
        ]
        for name, finish, reset in sources:
            try:
                values.extend(finish())
            except Exception:  # noqa: BLE001 - never raise into the training loop
                log_failure(name)
                reset()
        return values

    def _publish(self, values: StepValues, durations: list[float], started: float) -> None:
        """A sampled step: the sampling decision, one transfer of every device value, then a queue put."""
        host_tokens, device_tokens = self._tokens.take()
        host_gauges, device = self._host_gauges()
        extra = {_TOKENS_KEY: device_tokens} if device_tokens is not None else {}
        try:
            if self._sampler.adaptive:
                pressure = host_gauges.get(MEMORY_PRESSURE, (({}, None),))[0][1]
                extra[_DECISION_KEY] = agreed_inputs(values, self._publisher.take_anomalies(), pressure, device)
            gauges, histograms, host = to_host(values, extra)
        except Exception:  # noqa: BLE001
            log_failure("publish")
            gauges, histograms, host = {}, [], {}
        decision = SamplingInputs.from_vector(host[_DECISION_KEY]) if _DECISION_KEY in host else SamplingInputs()
        self._sampler.update(self._step, decision)
        tokens = host_tokens + (int(host[_TOKENS_KEY][0]) if _TOKENS_KEY in host else 0)
        gauges.update(host_gauges)
        gauges[TELEMETRY_SAMPLING_INTERVAL] = (({}, float(self._sampler.interval)),)
        publication = Publication(step=self._step, sampled=True, steps=1, tokens=tokens, durations=durations,
                                  gauges=gauges, histograms=histograms)
        publication.overhead = self._overhead + time.perf_counter() - started
        self._publisher.submit(publication)

    def _host_gauges(self) -> tuple[dict[str, GaugePoints], torch.device]:
        """Learning rates and memory pressure, read on the host; and the device the parameters live on."""
        optimizer = self._optimizer() if self._optimizer is not None else None
        if optimizer is None:
            return {}, torch.device("cpu")
        gauges: dict[str, GaugePoints] = {TRAIN_LEARNING_RATE: tuple(
            ({ATTR_PARAM_GROUP: str(index)}, float(group["lr"]))
            for index, group in enumerate(optimizer.param_groups) if "lr" in group)}
        params = trainable_params(optimizer)
        device = params[0].device if params else torch.device("cpu")
        pressure = memory_pressure(device)
        if pressure is not None:
            gauges[MEMORY_PRESSURE] = (({ATTR_DEVICE: str(device)}, pressure),)
        return gauges, device
