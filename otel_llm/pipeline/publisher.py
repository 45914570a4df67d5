"""The publisher: OTel instruments from the catalog, fed off the training thread.

The training thread only enqueues host values (:class:`Publication`); a daemon
thread records counters and histograms and swaps in the new :class:`Snapshot`
that observable-gauge callbacks read. NaN/Inf never reach the SDK: they are
dropped, and ``llm.telemetry.nonfinite{llm.signal}`` counts one event per
signal per sampled step that had any, gauge or histogram, whatever the number
of layers or measurements affected. A gauge that non-sampled steps carry too
(the last step's time) is read from its latest step, not the latest sample. KV-cache updates are recorded as they come
(generation has no steps), with the sliding-window hit ratio (#16). Every
sampled step's gauges, non-finite ones included, go to the anomaly detector;
each anomaly adds to ``llm.anomaly.events{llm.signal}``, logs one warning and
goes to ``on_anomaly`` (the OTel log record).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otel_llm.catalog import (
    ANOMALY_EVENTS,
    ATTR_SIGNAL,
    CATALOG,
    KV_CACHE_HIT_RATIO,
    KV_CACHE_HITS,
    KV_CACHE_LOOKUPS,
    TELEMETRY_NONFINITE,
    TELEMETRY_OVERHEAD,
    TELEMETRY_SAMPLED_STEPS,
    TRAIN_STEP_DURATION,
    MetricSpec,
)
from otel_llm.pipeline.anomaly import Anomaly, AnomalyMonitor
from otel_llm.pipeline.batching import PendingCounts
from otel_llm.pipeline.transfer import Publication, Snapshot
from otel_llm.runtime import fork
from otel_llm.runtime.log_once import LogOnce, once

__all__ = ["AnomalySink", "KvCacheWindow", "Publisher", "Recorder", "create_recorder"]

_logger = logging.getLogger(__name__)
_QUEUE_LIMIT = 256

Recorder = Callable[[float, Mapping[str, str]], None]
"""Records one value with attributes into a synchronous instrument, whatever its kind."""
AnomalySink = Callable[[Anomaly, float], None]
"""Receives each anomaly with the threshold it crossed (the log-record writer)."""


def create_recorder(meter: Meter, spec: MetricSpec) -> Recorder:
    """A synchronous instrument for ``spec`` behind one call (observable gauges are the publisher's).

    A negative value for a counter or a histogram is dropped with one warning
    per metric, as the OTel SDK's own semantics say, never raised: the call may
    come from the training loop.
    """
    common = {"name": spec.name, "unit": spec.unit, "description": spec.description}
    if spec.instrument == "counter":
        counter = meter.create_counter(**common)
        return _non_negative(spec, counter.add)
    if spec.instrument == "up_down_counter":
        return meter.create_up_down_counter(**common).add
    if spec.instrument == "histogram":
        histogram = meter.create_histogram(**common, explicit_bucket_boundaries_advisory=spec.buckets)
        return _non_negative(spec, histogram.record)
    if spec.instrument == "gauge":
        return meter.create_gauge(**common).set
    raise ValueError(f"{spec.name}: {spec.instrument} is not a synchronous instrument")


def _non_negative(spec: MetricSpec, record: Recorder) -> Recorder:
    what = "a counter cannot decrease" if spec.instrument == "counter" else "a histogram takes values >= 0"

    def checked(value: float, attributes: Mapping[str, str]) -> None:
        if value < 0:
            once(_logger, logging.WARNING, ("negative", spec.name),
                 "otel_llm: %s got %g; %s, so negative values are dropped", spec.name, value, what)
            return
        record(value, attributes)

    return checked


class KvCacheWindow:
    """Reused / (reused + added) over the last ``size`` cache updates, kept as running sums."""

    def __init__(self, size: int = 64) -> None:
        self._updates: deque[tuple[int, int]] = deque()
        self._size = size
        self._reused = 0
        self._total = 0
        self._lock = threading.Lock()

    def update(self, reused: int, added: int) -> None:
        if reused < 0 or added < 0:
            raise ValueError(f"KV-cache counts must be >= 0, got reused={reused}, added={added}")
        with self._lock:
            self._updates.append((reused, reused + added))
            self._reused += reused
            self._total += reused + added
            if len(self._updates) > self._size:
                old_reused, old_total = self._updates.popleft()
                self._reused -= old_reused
                self._total -= old_total

    def ratio(self) -> float | None:
        """The hit ratio, or None before any update with lookups."""
        with self._lock:
            return self._reused / self._total if self._total else None


class Publisher:
    """Owns the catalog instruments of one provider and the exporter-side thread."""

    def __init__(self, meter: Meter, anomalies: AnomalyMonitor | None = None,
                 on_anomaly: AnomalySink | None = None, pending: PendingCounts | None = None) -> None:
        self._pending = pending
        """Batched unsampled steps: taken here when the training thread has not handed them over in time."""
        self._snapshot = Snapshot()
        self._every_step: dict[str, tuple[tuple[Mapping[str, str], float], ...]] = {}
        """Gauges that non-sampled steps carry too (the last step's time): their latest value, read first."""
        self._anomalies = anomalies
        self._on_anomaly = on_anomaly
        self._flagged = 0
        self._flagged_lock = threading.Lock()
        self._kv = KvCacheWindow()
        self._sync: dict[str, Recorder] = {}
        for spec in CATALOG:
            if spec.instrument == "observable_gauge":
                meter.create_observable_gauge(spec.name, callbacks=[self._gauge_callback(spec.name)],
                                              unit=spec.unit, description=spec.description)
            else:
                self._sync[spec.name] = create_recorder(meter, spec)
        self._queue: queue.Queue[Publication | None] = queue.Queue()
        self._logged = LogOnce()
        self._thread = threading.Thread(target=self._run, name="otel_llm-publisher", daemon=True)
        self._thread.start()

    # -- gauges ---------------------------------------------------------------
    def _gauge_callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            if name == KV_CACHE_HIT_RATIO:
                ratio = self._kv.ratio()
                return [] if ratio is None else [Observation(ratio)]
            points = self._every_step.get(name) or self._snapshot.gauges.get(name, ())
            return [Observation(value, attributes) for attributes, value in points]

        return callback

    # -- training-thread side -------------------------------------------------
    def submit(self, publication: Publication) -> None:
        """Enqueue without blocking; past the limit publications are dropped (logged once)."""
        if self._queue.qsize() >= _QUEUE_LIMIT:
            self._logged(_logger, logging.WARNING, "dropping",
                         "otel_llm: exporter thread is behind; dropping telemetry publications")
            return
        self._queue.put_nowait(publication)

    def take_anomalies(self) -> int:
        """Anomalies flagged since the last call (for the sampler; the exporter thread adds to it)."""
        with self._flagged_lock:
            flagged, self._flagged = self._flagged, 0
        return flagged

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted publication is recorded (at most ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            time.sleep(0.001)
        return True

    def close(self, timeout: float) -> None:
        self.drain(timeout)
        self._queue.put_nowait(None)

    # -- manual recording (caller's thread) -------------------------------------
    def record_kv_cache(self, reused: int, added: int) -> None:
        if fork.forked:  # see otel_llm.runtime.fork: a worker's recording could wait on a copied lock
            return
        self._kv.update(reused, added)
        self._sync[KV_CACHE_HITS](reused, {})
        self._sync[KV_CACHE_LOOKUPS](reused + added, {})

    def count_nonfinite(self, signal: str) -> None:
        if not fork.forked:
            self._sync[TELEMETRY_NONFINITE](1, {ATTR_SIGNAL: signal})

    # -- exporter thread --------------------------------------------------------
    def _run(self) -> None:
        idle = self._pending.window if self._pending is not None else None
        while True:
            try:
                publication = self._queue.get(timeout=idle)
            except queue.Empty:  # training paused: a batch of its last steps may be waiting
                if self._pending is not None:
                    self._pending.hand_over(self.submit, stale_only=True)
                continue
            try:
                if publication is None:
                    return
                self._record(publication)
            except Exception:  # noqa: BLE001 - the exporter thread must survive anything
                # once: a lasting failure would log a traceback every sampled step
                self._logged(_logger, logging.WARNING, "record failed", "otel_llm: failed to record step telemetry",
                             exc_info=True)
            finally:
                self._queue.task_done()

    def _finite_gauges(self, publication: Publication) -> dict[str, tuple[tuple[Mapping[str, str], float], ...]]:
        """The publication's finite gauge points; a signal with any non-finite point counts one event."""
        gauges: dict[str, tuple[tuple[Mapping[str, str], float], ...]] = {}
        for name, points in publication.gauges.items():
            kept = tuple((attrs, float(value)) for attrs, value in points if math.isfinite(value))
            if len(kept) < len(points):
                self.count_nonfinite(name)
            if kept:
                gauges[name] = kept
        return gauges

    def _record(self, publication: Publication) -> None:
        sync = self._sync
        for name, attributes, increment in publication.counters:
            count = int(increment)  # a device count of a non-sampled step is read here, off the training thread
            if count:
                sync[name](count, attributes)
        for duration in publication.durations:
            sync[TRAIN_STEP_DURATION](duration, {})
        nonfinite: set[str] = set()  # once per signal, however many of its layers or measurements
        for name, attributes, measurements in publication.histograms:
            instrument = sync.get(name)
            if instrument is None:
                continue
            finite = measurements[np.isfinite(measurements)]
            if finite.size < measurements.size:
                nonfinite.add(name)
            for value in finite[finite >= 0].tolist():
                instrument(value, attributes)
        for name in nonfinite:
            self.count_nonfinite(name)
        for name, points in publication.gauges.items():  # gauges of every step: no SDK call, a dict entry
            if not publication.sampled or name in self._every_step:
                self._every_step[name] = tuple((a, float(v)) for a, v in points if math.isfinite(v))
        if not publication.sampled:
            return
        sync[TELEMETRY_SAMPLED_STEPS](1, {})
        if publication.overhead is not None:
            sync[TELEMETRY_OVERHEAD](publication.overhead, {})
        self._snapshot = Snapshot(self._finite_gauges(publication))
        if self._anomalies is not None:
            self._flag_anomalies(self._anomalies, publication.step, publication.gauges)

    def _flag_anomalies(self, monitor: AnomalyMonitor, step: int,
                        gauges: Mapping[str, Iterable[tuple[Mapping[str, str], float]]]) -> None:
        flagged = monitor.observe(step, gauges)
        for anomaly in flagged:
            self._sync[ANOMALY_EVENTS](1, {ATTR_SIGNAL: anomaly.signal})
            _logger.warning("otel_llm: anomaly in %s%s at step %d (score %.3g > %.3g)", anomaly.signal,
                            dict(anomaly.attributes) or "", anomaly.step, anomaly.score, monitor.threshold)
            if self._on_anomaly is not None:
                self._on_anomaly(anomaly, monitor.threshold)
        if flagged:
            with self._flagged_lock:
                self._flagged += len(flagged)
