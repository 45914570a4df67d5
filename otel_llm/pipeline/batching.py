"""Unsampled steps' counters and timings, batched on the training thread.

Handing every step to the exporter thread wakes that thread every step: on fast
steps (10 ms) the thread switch, and the SDK calls behind it competing for the
interpreter, cost more than the bookkeeping itself. Each step is added here instead
(a few dict and list updates) and the batch goes to the exporter thread once it is
``window`` seconds old. The exporter thread takes a batch that waited longer than
that itself when training pauses (evaluation, checkpointing), so exported counts
lag a running loop by at most about twice the window; a flush, a shutdown and a
sampled step take the batch at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import torch

from otel_llm.pipeline.transfer import CounterPoint, GaugePoints, HistogramPoints, Publication

__all__ = ["BATCH_WINDOW_SECONDS", "PendingCounts"]

BATCH_WINDOW_SECONDS = 0.5
"""How long a batch of unsampled steps may wait on the training thread: far below any scrape or push interval."""


class PendingCounts:
    """Counters, durations, host histograms and latest gauges of steps not yet handed to the exporter."""

    def __init__(self, window: float = BATCH_WINDOW_SECONDS) -> None:
        self.window = window
        """Seconds a batch may wait (the exporter thread also checks for a stale one this often)."""
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._host: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Mapping[str, str], int]] = {}
        self._device: list[CounterPoint] = []
        self._durations: list[float] = []
        self._histograms: list[HistogramPoints] = []
        self._gauges: dict[str, GaugePoints] = {}
        self._since: float | None = None
        self._step = 0

    def add(self, step: int, counters: list[CounterPoint], durations: list[float],
            histograms: list[HistogramPoints], gauges: dict[str, GaugePoints]) -> bool:
        """Add one step's values; True when the batch is due (older than the window)."""
        now = time.monotonic()
        with self._lock:
            for name, attributes, increment in counters:
                if isinstance(increment, torch.Tensor):  # a device count: read on the exporter thread
                    self._device.append((name, attributes, increment))
                    continue
                key = (name, tuple(sorted(attributes.items())))
                _, total = self._host.get(key, (attributes, 0))
                self._host[key] = (attributes, total + increment)
            self._durations.extend(durations)
            self._histograms.extend(histograms)
            self._gauges.update(gauges)
            self._step = step
            if self._since is None and (counters or durations or histograms or gauges):
                self._since = now
            return self._since is not None and now - self._since >= self.window

    def hand_over(self, submit: Callable[[Publication], None], stale_only: bool = False) -> None:
        """Submit the batch as one non-sampled publication (nothing when empty, or, ``stale_only``, not yet due).

        Submitted under the batch's lock: a flush that finds the batch empty finds it already queued.
        """
        with self._lock:
            if self._since is None or (stale_only and time.monotonic() - self._since < self.window):
                return
            counters: list[CounterPoint] = [(name, attributes, total)
                                            for (name, _), (attributes, total) in self._host.items() if total]
            submit(Publication(step=self._step, sampled=False, counters=[*counters, *self._device],
                               durations=self._durations, gauges=self._gauges, histograms=self._histograms))
            self._clear()
