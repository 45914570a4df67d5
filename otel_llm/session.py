"""The instrumentation session: one training run's probes, step clock and publishing.

The session follows one optimizer: its pre-step hook lets the probes read the
final gradients, its post-step hook ends the step. On a sampled step the
probes' device values and the sampling decision go to the host in one
transfer and on to the publisher's thread; other steps hand over only their
counters. Everything a probe measures is the probe's business
(:mod:`otel_llm.probes`); the session drives the clock and publishes.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from otel_llm.catalog import (
    TELEMETRY_SAMPLING_INTERVAL,
    TRAIN_SKIPPED_STEPS,
    TRAIN_STEP_FASTEST,
    TRAIN_STEP_SKEW_RATIO,
    TRAIN_STEP_SLOWEST,
    TRAIN_STEPS,
    MetricSpec,
)
from otel_llm.config import Config
from otel_llm.export.events import AnomalyLog, GuardLog
from otel_llm.export.provider import ProviderBundle, build_provider
from otel_llm.guards import GuardListener, make_guards
from otel_llm.pipeline.anomaly import Anomaly, make_monitor
from otel_llm.pipeline.batching import PendingCounts
from otel_llm.pipeline.clock import StepClock
from otel_llm.pipeline.publisher import AnomalySink, Publisher
from otel_llm.pipeline.sampler import SamplingInputs, make_sampler
from otel_llm.pipeline.transfer import CounterPoint, GaugePoints, HostStep, Publication, to_host
from otel_llm.probes._deepspeed import UPDATE, initializing
from otel_llm.probes._wrappers import innermost_optimizer
from otel_llm.probes.base import StepValues, log_failure
from otel_llm.probes.loss import TRAINING_STEP, LossProbe, inside_training_step
from otel_llm.probes.optimizer import OptimizerProbe, parameter_device, trainable_params
from otel_llm.probes.registry import build_probes
from otel_llm.probes.step_time import StepTimeProbe
from otel_llm.runtime import fork
from otel_llm.runtime.log_once import once
from otel_llm.runtime.rank import rank_info
from otel_llm.runtime.termination import install_sigterm_handler
from otel_llm.schema import load_schema
from otel_llm.user_metrics import UserMetrics, as_number, describe, is_scalar
from otel_llm.version import __version__

__all__ = ["Instrumentation", "active", "check_types"]

_logger = logging.getLogger(__name__)

_sessions: set[Instrumentation] = set()
"""Sessions not yet shut down, held strongly: a session whose handle the caller dropped (the usual
``otel_llm.instrument(model, optimizer)`` inside ``main()``) still exports until shutdown or exit."""


def active() -> Instrumentation | None:
    """The most recently started session that is still running."""
    live = [s for s in _sessions if not s.closed]
    return max(live, key=lambda s: s._started) if live else None


def _deliver_anomaly(sinks: list[AnomalySink], anomaly: Anomaly, threshold: float) -> None:
    """The publisher flagged ``anomaly``: the log record, then the user's callbacks (exporter thread)."""
    for sink in list(sinks):
        try:
            sink(anomaly, threshold)
        except Exception:  # noqa: BLE001 - a callback must not stop the exporter thread
            once(_logger, logging.WARNING, ("on_anomaly", id(sink)),
                 "otel_llm: an on_anomaly callback raised; it keeps being called", exc_info=True)


def _shutdown_all() -> None:
    for session in list(_sessions):
        session.shutdown()


atexit.register(_shutdown_all)


def _count(value: object) -> int | None:
    """A KV-cache count: a whole number >= 0 (int, float or one-element tensor), else None."""
    number = as_number(value)
    if number is None or not 0 <= number < float("inf") or number != int(number):
        return None
    return int(number)


def check_types(model: object, optimizer: object) -> torch.optim.Optimizer | None:
    """The torch optimizer to follow (the one inside a DeepSpeed or accelerate wrapper); ValueError for wrong types."""
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is None:
        return None
    inner = innermost_optimizer(optimizer)
    if inner is None:
        raise ValueError("optimizer must be a torch.optim.Optimizer or a wrapper of one (DeepSpeed, accelerate), "
                         f"got {type(optimizer).__name__}")
    return inner


class Instrumentation:
    """A running otel_llm session; returned by :func:`otel_llm.instrument`.

    Use it as a context manager or call :meth:`shutdown`. Hooks never raise into
    the training loop: a failing probe is logged once and skipped for the step.
    """

    def __init__(self, model: torch.nn.Module | None = None, optimizer: Any = None, *,
                 config: Config | None = None, meter_provider: MeterProvider | None = None,
                 bundle: ProviderBundle | None = None, extra_readers: Iterable[MetricReader] = (),
                 schema: Sequence[MetricSpec] | None = None) -> None:
        optimizer = check_types(model, optimizer)
        self.config = config if config is not None else Config()
        if schema is None:
            schema = bundle.schema if bundle is not None else (
                load_schema(self.config.schema_path) if self.config.schema_path else ())
        if bundle is not None:
            self._bundle, self._owns_provider = bundle, True
        elif meter_provider is not None:
            self._bundle, self._owns_provider = ProviderBundle(meter_provider), False  # type: ignore[arg-type]
        else:
            self._bundle, self._owns_provider = build_provider(self.config, schema, extra_readers), True
        meter = self._bundle.provider.get_meter("otel_llm", __version__)
        self._meter = meter
        logs = self._bundle.logger_provider
        self._anomaly_sinks: list[AnomalySink] = [AnomalyLog(logs).emit] if logs is not None else []
        # the sinks, not a method: the exporter thread must not keep a shut-down session alive
        self._pending = PendingCounts()
        self._publisher = Publisher(meter, make_monitor(self.config),
                                    on_anomaly=functools.partial(_deliver_anomaly, self._anomaly_sinks),
                                    pending=self._pending)
        self._guards = make_guards(self.config, GuardLog(logs).emit if logs is not None else None)
        self._user = UserMetrics(meter, schema, self._bundle.schema, self._publisher.count_nonfinite)

        self._clock = StepClock(make_sampler(self.config))
        self._probes = build_probes(self.config, record_kv_cache=self._publisher.record_kv_cache)
        self._handles: list[RemovableHandle] = []
        self._optimizer: weakref.ref[torch.optim.Optimizer] | None = None
        self._gradients_read_externally = False
        self._update_depth = 0
        self._deferred: torch.optim.Optimizer | None = None
        """An update that completed inside ``Trainer.training_step``: it ends when that call returns."""
        """Nesting of DeepSpeed wrapper ``step()`` calls in progress: inner torch steps are parts of one update."""
        self._inner_steps = 0
        self._overhead = 0.0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.closed = False

        if optimizer is not None:
            self._adopt(optimizer)
            self._handles.append(optimizer.register_step_pre_hook(self._on_pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._on_post_step))
        else:
            self._handles.append(register_optimizer_step_pre_hook(self._on_pre_step))
            self._handles.append(register_optimizer_step_post_hook(self._on_post_step))
        self._model: weakref.ref[torch.nn.Module] | None = None
        self._model_checked = model is not None
        if model is not None:
            self._model = weakref.ref(model)
        self._probes.start(model, self._clock.sampled, adopt=self._adopt_model)
        UPDATE.add_listener(self._on_update)
        TRAINING_STEP.add_listener(self._after_training_step)  # after the loss probe's: it has the loss then
        _sessions.add(self)
        install_sigterm_handler(_shutdown_all, self.config.shutdown_timeout)

    # -- public surface ---------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps seen so far."""
        return self._clock.step

    @property
    def sampled(self) -> bool:
        """Whether the current step computes the expensive signals (known before its forward pass)."""
        return self._clock.sampled

    @property
    def sampling_interval(self) -> int:
        """Steps between sampled steps as the sampling policy sets it now (1 during adaptive warm-up)."""
        return self._clock.sampler.interval

    @property
    def meter_provider(self) -> MeterProvider:
        return self._bundle.provider

    @property
    def prometheus_url(self) -> str | None:
        """The scrape URL of this session's Prometheus endpoint, if it serves one."""
        return self._bundle.prometheus_url

    def attach(self, model: torch.nn.Module | None = None, optimizer: Any = None) -> None:
        """Point an existing session at a model/optimizer (e.g. an explicit call under zero-code)."""
        optimizer = check_types(model, optimizer)
        if model is not None and self._model is None:
            self._attach_model(model)
        if optimizer is not None:
            if self._optimizer is None:
                self._adopt(optimizer)
            elif self._optimizer() is not optimizer:
                _logger.warning("otel_llm: already following another optimizer; ignoring the new one")

    def record_loss(self, loss: float | torch.Tensor) -> None:
        """Report the step's training loss from a custom loop (overrides the intercepted loss).

        Checked on every call, sampled step or not, so a wrong value shows at once; it is
        then dropped with one warning, never raised into the loop.
        """
        if not is_scalar(loss):
            once(_logger, logging.WARNING, ("record_loss", type(loss).__name__),
                 "otel_llm: record_loss() takes a number or a one-element tensor, got %s; dropped",
                 describe(loss))
            return
        probe = self._probes.get(LossProbe)
        if self._clock.sampled and not self.closed and probe is not None:
            probe.record_manual_loss(loss)

    def record_kv_cache(self, reused: int, added: int) -> None:
        """Report one KV-cache update: ``reused`` entries served from cache, ``added`` newly computed."""
        hits, new = _count(reused), _count(added)
        if hits is None or new is None:
            once(_logger, logging.WARNING, ("record_kv_cache", "counts"),
                 "otel_llm: record_kv_cache() takes two whole numbers >= 0, got reused=%s, added=%s; dropped",
                 describe(reused), describe(added))
            return
        self._publisher.record_kv_cache(hits, new)

    def read_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Read the step's gradients now; from then on the optimizer's pre-step hook leaves them alone.

        For loops that run forward and backward inside ``optimizer.step(closure)``
        (Lightning): the pre-step hook fires before the closure, when the step's
        gradients do not exist yet. Call this where they are final, before the update.
        """
        self._gradients_read_externally = True
        self._pre_step(optimizer)

    def on_anomaly(self, callback: AnomalySink) -> None:
        """Call ``callback(anomaly, threshold)`` for every anomaly flagged (on the exporter thread).

        E.g. to save a checkpoint; to stop the run, set a flag the loop reads. What it raises is logged once.
        """
        self._anomaly_sinks.append(callback)

    def on_guard(self, callback: GuardListener) -> None:
        """Call ``callback(action)`` after each guard action (on the training thread, inside the optimizer step)."""
        if self._guards is not None:
            self._guards.add_listener(callback)
        else:
            once(_logger, logging.INFO, ("on_guard", "no guards"),
                 "otel_llm: on_guard() without an enabled guard (Config(guards=...) / OTEL_LLM_GUARDS): never called")

    def follow_scheduler(self, scheduler: Any) -> None:
        """Let ``lr_backoff`` scale this LR scheduler's base rates too (the framework callbacks do it for you)."""
        if self._guards is not None:
            self._guards.follow_scheduler(scheduler)

    def register(self, name: str, instrument: str, *, unit: str = "", description: str = "",
                 attributes: Iterable[str] = (), buckets: Iterable[float] | None = None) -> MetricSpec:
        """Declare a custom metric at run time (same rules as the schema file); returns its spec."""
        raw: dict[str, Any] = {"name": name, "instrument": instrument, "unit": unit,
                               "description": description, "attributes": list(attributes)}
        if buckets is not None:
            raw["buckets"] = list(buckets)
        return self._user.register(raw)

    def record(self, name: str, value: float, attributes: Mapping[str, str] | None = None) -> None:
        """Record a value of a schema-declared or registered metric; NaN/Inf are counted, not sent.

        Attribute keys the metric does not declare are dropped, as its View drops
        them; a call that cannot be recorded is dropped with one warning, never raised.
        """
        self._user.record(name, value, attributes)

    def flush(self, timeout: float | None = None) -> bool:
        """Publish pending token counts and push OTLP now; bounded by ``timeout`` (default: config)."""
        limit = self.config.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._lock:
            self._submit_counts(steps=0, durations=[], now=True)
        drained = self._publisher.drain(max(0.0, deadline - time.monotonic()))
        if not self._owns_provider:
            return drained
        return self._bundle.flush(max(0.05, deadline - time.monotonic())) and drained

    def shutdown(self) -> None:
        """Remove every hook, publish what is pending and close the exporters; idempotent and bounded."""
        if self.closed:
            return
        self.closed = True
        _sessions.discard(self)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        UPDATE.remove_listener(self._on_update)
        TRAINING_STEP.remove_listener(self._after_training_step)
        if self._guards is not None:
            self._guards.close()
        self._probes.detach()
        if fork.forked:
            return
        deadline = time.monotonic() + self.config.shutdown_timeout
        with self._lock:
            self._submit_counts(steps=0, durations=[], now=True)
        self._publisher.close(max(0.0, deadline - time.monotonic()) / 2)
        if self._owns_provider:
            self._bundle.shutdown(max(0.05, deadline - time.monotonic()))

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- model and optimizer ------------------------------------------------------
    def _attach_model(self, model: torch.nn.Module) -> None:
        self._model = weakref.ref(model)
        self._probes.attach(model, self._clock.sampled)

    def _adopt(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)

    def _adopt_model(self, model: torch.nn.Module) -> None:
        """Zero-code discovery: ``model`` is entering its first training forward."""
        if self._model is None and not self.closed:
            self._attach_model(model)

    def _check_model(self, optimizer: torch.optim.Optimizer) -> None:
        """At the first step, say when no model was found or the one adopted does not own the optimizer's parameters."""
        self._model_checked = True
        model = self._model() if self._model is not None else None
        if model is None:
            _logger.info("otel_llm: no model was seen training before the first optimizer step; token counts and "
                         "model signals need instrument(model=...)")
            return
        if self._update_depth:  # DeepSpeed steps flat copies of the model's parameters: no module owns them
            return
        owned = {id(p) for p in model.parameters()}
        if not any(id(p) in owned for p in trainable_params(optimizer)):
            _logger.warning("otel_llm: the model adopted at its first training forward (%s) owns none of the "
                            "optimizer's parameters; its signals are exported as they are (pass "
                            "instrument(model=...) to choose the model)", type(model).__name__)

    def _owns(self, optimizer: torch.optim.Optimizer) -> bool:
        if self._optimizer is None:
            self._adopt(optimizer)
            return True
        return self._optimizer() is optimizer

    # -- optimizer hooks ----------------------------------------------------------
    def _on_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._gradients_read_externally and not initializing():
            try:
                self._pre_step(optimizer)
            except Exception:  # noqa: BLE001 - the probes guard themselves; this guards the rest of the hook
                log_failure("optimizer pre-step")

    def _pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        if fork.forked or self.closed or not self._owns(optimizer):
            return
        if not self._model_checked:
            self._check_model(optimizer)
        plan = self._clock.plan()
        if self._guards is not None and not self._update_depth:  # guards: skip_nonfinite and clipping act here
            self._guards.before_update(optimizer, plan.step)
        if not (plan.sampled or plan.next_sampled):
            return
        started = time.perf_counter()
        self._probes.before_update(optimizer, plan)
        self._overhead += time.perf_counter() - started

    def _on_post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if fork.forked or self._optimizer is None or self._optimizer() is not optimizer or initializing():
            return
        if self._update_depth:  # one group of a DeepSpeed update: the update ends when its wrapper returns
            self._inner_steps += 1
            return
        if self._guards is not None:  # an update a guard withheld is no training step
            withheld = self._guards.after_update()
            if withheld is not None:
                self._skip_update(withheld)
                return
        self._end_step(optimizer)

    def _on_update(self, wrapper: Any, begins: bool) -> None:
        """A DeepSpeed wrapper's ``step()`` begins or returns: the bounds of one update of its torch optimizer."""
        if fork.forked or self.closed:
            return
        try:
            self._update_bound(wrapper, begins)
        except Exception:  # noqa: BLE001 - inside DeepSpeed's step: never raise into it
            log_failure("DeepSpeed update")

    def _update_bound(self, wrapper: Any, begins: bool) -> None:
        optimizer = innermost_optimizer(wrapper)
        if optimizer is None or not self._owns(optimizer):
            return
        probe = self._probes.get(OptimizerProbe)
        if begins:
            self._update_depth += 1
            if self._update_depth == 1:
                self._inner_steps = 0
                if probe is not None:
                    probe.begin_update(wrapper)
            return
        self._update_depth = max(0, self._update_depth - 1)
        if self._update_depth:
            return
        if self._inner_steps:
            if probe is not None:
                probe.end_update(wrapper)
            self._end_step(optimizer)
        else:  # the wrapper skipped the update (fp16 overflow): not a training step
            self._skip_update([(TRAIN_SKIPPED_STEPS, {}, 1)])

    def _skip_update(self, counters: list[CounterPoint]) -> None:
        """An update that was not applied: the step does not end, its gradient partials are dropped."""
        probe = self._probes.get(OptimizerProbe)
        if probe is not None:
            probe.reset()
        self._publisher.submit(Publication(step=self._clock.step, sampled=False, counters=counters, durations=[]))

    def _after_training_step(self, result: Any) -> None:
        """``Trainer.training_step`` returned: end the update that completed inside it, if any."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None and not inside_training_step():
            self._end_step(deferred)
        else:
            self._deferred = deferred

    def _end_step(self, optimizer: torch.optim.Optimizer) -> None:
        """One optimizer update is complete: publish it and advance the step clock.

        An update inside ``Trainer.training_step`` ends when that call has returned its loss.
        """
        if inside_training_step():
            self._deferred = optimizer
            return
        now = time.perf_counter()
        with self._lock:
            self._probes.end_step()
            try:
                durations = self._clock.durations(now)
                if self._clock.sampled:
                    self._publish(optimizer, durations, started=now)
                else:
                    self._submit_counts(steps=1, durations=durations)
            except Exception:  # noqa: BLE001 - the step's telemetry is lost, never the step
                log_failure("publish")
            self._probes.begin_step(self._clock.advance())
            self._overhead = 0.0
            self._clock.mark_end()

    # -- publishing -------------------------------------------------------------
    def _submit_counts(self, steps: int, durations: list[float], now: bool = False) -> None:
        """Counters of a non-sampled step and its host timings, batched (see :mod:`otel_llm.pipeline.batching`).

        The batch goes to the exporter thread when it is due or ``now``; device counts are read off-thread.
        """
        tally = self._probes.tally()
        counters: list[CounterPoint] = list(tally.counters)
        if steps:
            counters.insert(0, (TRAIN_STEPS, {}, steps))
        histograms = [(h.name, h.attributes, h.values) for h in tally.histograms
                      if isinstance(h.values, np.ndarray)]  # host values by contract
        gauges: dict[str, GaugePoints] = {g.name: ((g.attributes, float(g.value)),) for g in tally.gauges}
        if self._pending.add(self._clock.step, counters, durations, histograms, gauges) or now:
            self._pending.hand_over(self._publisher.submit)

    def _publish(self, optimizer: torch.optim.Optimizer, durations: list[float], started: float) -> None:
        """A sampled step: the probes' values and the sampling decision in one transfer, then a queue put."""
        values = self._probes.finish(optimizer)
        host = self._to_host(values, parameter_device(optimizer))
        sampler = self._clock.sampler
        inputs = SamplingInputs.decode(host.decision) if host.decision is not None else SamplingInputs()
        sampler.update(self._clock.step, inputs)
        actions = self._guards.decide(self._clock.step, inputs, optimizer) if self._guards is not None else []
        gauges = dict(host.gauges)
        gauges[TELEMETRY_SAMPLING_INTERVAL] = (({}, float(sampler.interval)),)
        if inputs.fastest_step > 0 and rank_info().rank == 0:  # agreed, so one rank exports it, not every rank
            gauges[TRAIN_STEP_SLOWEST] = (({}, inputs.slowest_step),)
            gauges[TRAIN_STEP_FASTEST] = (({}, inputs.fastest_step),)
            gauges[TRAIN_STEP_SKEW_RATIO] = (({}, inputs.slowest_step / inputs.fastest_step - 1.0),)
        publication = Publication(step=self._clock.step, sampled=True,
                                  counters=[(TRAIN_STEPS, {}, 1), *host.counters, *actions], durations=durations,
                                  gauges=gauges, histograms=host.histograms)
        publication.overhead = (self._overhead + self._probes.take_host_seconds()
                                + time.perf_counter() - started)
        self._pending.hand_over(self._publisher.submit)  # the unsampled steps before this one first
        self._publisher.submit(publication)

    def _to_host(self, values: StepValues, device: torch.device) -> HostStep:
        """One transfer of the step's device values, with the cross-rank sampling decision when adaptive."""
        try:
            step_time = self._probes.get(StepTimeProbe)
            agree = self._clock.sampler.adaptive or (self._guards is not None and self._guards.needs_decision)
            decision = (SamplingInputs.encode(values, self._publisher.take_anomalies(), device,
                                              step_time.window_step_seconds if step_time is not None else math.nan)
                        if agree else None)
            return to_host(values, decision)
        except Exception:  # noqa: BLE001 - the step's signals are lost; its host counts are not
            log_failure("publish")
            return HostStep({}, [], [c for c in values.counters if not isinstance(c.value, torch.Tensor)], None)
