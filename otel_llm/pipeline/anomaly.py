"""SAX anomaly detection over each gauge signal's recent sampled history.

Each series keeps its last ``baseline + window`` finite values. The whole
history is z-normalised with the baseline's mean and standard deviation; the
baseline's sliding windows become SAX words (PAA to ``segments`` means, Gaussian
breakpoints for an ``alphabet``-letter alphabet), and the recent window stays a
real-valued PAA. The score is the mean, over the baseline words, of the iSAX
lower bound MINDIST(recent PAA, word) = sqrt(window / segments) * ||d||, where
d is each PAA mean's distance to its letter's breakpoint interval. Keeping the
recent side unquantised matters: with Gaussian breakpoints the top letter
covers everything above ~1.2 sigma, so a 10 sigma spike and a 1.3 sigma wobble
would otherwise read the same.

The score is taken twice, on the values as they are and on their residuals
from the baseline's least-squares line over training steps, and the smaller
counts: a signal that keeps moving the way it moved (early training, a
learning-rate schedule, a new sampling interval stretching a trend) is not an
anomaly; a break in that movement, a spike, a shift or a new drift is.

A series flags once when its score rises above ``threshold`` and re-arms when
it falls below half of it, so a lasting level shift is one event, not one per
step; a score ten times the one that opened the event (a blow-up on top of a
drift) is a new event. Pure numpy, called from the exporter thread; memory is
bounded by ``max_series`` pairs of deques of ``baseline + window`` numbers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from otel_llm.catalog import ANOMALY_EVENTS, MEMORY_PRESSURE, TELEMETRY_SAMPLING_INTERVAL, TRAIN_LEARNING_RATE
from otel_llm.config import Config

__all__ = ["Anomaly", "AnomalyMonitor", "SaxDetector", "gaussian_breakpoints", "make_monitor"]

_REARM_FRACTION = 0.5
_ESCALATION = 10.0
_LARGEST_GAP = 1e150  # squared stays finite: a blown-up signal scores huge, not inf


def gaussian_breakpoints(alphabet: int) -> np.ndarray:
    """The ``alphabet - 1`` cut points that split N(0, 1) into equiprobable letters."""
    if alphabet < 2:
        raise ValueError(f"a SAX alphabet needs at least 2 letters, got {alphabet}")
    return np.array([NormalDist().inv_cdf(i / alphabet) for i in range(1, alphabet)])


class SaxDetector:
    """One series: feed sampled values with :meth:`update`; it answers the score and whether it flags."""

    def __init__(self, baseline: int = 64, window: int = 8, segments: int = 4, alphabet: int = 8,
                 threshold: float = 6.5) -> None:
        if segments < 1 or window % segments:
            raise ValueError(f"the window ({window}) must split into a whole number of segments ({segments})")
        if baseline < window:
            raise ValueError(f"the baseline ({baseline}) must be at least one window ({window}) long")
        if not threshold > 0:
            raise ValueError(f"the anomaly threshold must be > 0, got {threshold}")
        self.baseline, self.window, self.segments, self.threshold = baseline, window, segments, threshold
        cuts = gaussian_breakpoints(alphabet)
        self._cuts = cuts
        self._lower = np.concatenate([[-np.inf], cuts])
        self._upper = np.concatenate([cuts, [np.inf]])
        starts = np.arange(baseline - window + 1)[:, None]
        self._word_index = starts + np.arange(window)[None, :]
        self._history: deque[float] = deque(maxlen=baseline + window)
        self._steps: deque[int] = deque(maxlen=baseline + window)
        self._open_score: float | None = None

    def score(self) -> float | None:
        """The smaller of the flat and the detrended score; None until the history is full."""
        if len(self._history) < self._history.maxlen:  # type: ignore[operator]
            return None
        history = np.fromiter(self._history, dtype=np.float64, count=len(self._history))
        steps = np.fromiter(self._steps, dtype=np.float64, count=len(self._steps))
        base, base_steps = history[: self.baseline], steps[: self.baseline]
        mean, centre = base.mean(), base_steps.mean()
        offsets = base_steps - centre
        slope = float((offsets * (base - mean)).sum() / max(float((offsets * offsets).sum()), 1e-300))
        flat = self._mindist(history - mean)
        trend = self._mindist(history - (mean + slope * (steps - centre)))
        return min(flat, trend)

    def _mindist(self, residuals: np.ndarray) -> float:
        """Mean MINDIST(recent PAA, baseline word) of residuals z-normalised by the baseline's spread."""
        spread = max(float(residuals[: self.baseline].std()), 1e-9 * float(np.abs(residuals).max()), 1e-300)
        z = residuals / spread
        recent = z[self.baseline:].reshape(self.segments, -1).mean(axis=1)
        words = z[self._word_index].reshape(len(self._word_index), self.segments, -1).mean(axis=2)
        letters = np.searchsorted(self._cuts, words)
        lower, upper = self._lower[letters], self._upper[letters]
        gap = np.where(recent < lower, lower - recent, np.where(recent > upper, recent - upper, 0.0))
        gap = np.minimum(gap, _LARGEST_GAP)
        distances = math.sqrt(self.window / self.segments) * np.sqrt((gap * gap).sum(axis=1))
        return float(distances.mean())

    def update(self, value: float, step: int | None = None) -> tuple[bool, float | None]:
        """Add the value sampled at ``step`` (default: one after the last); (flagged now, score).

        Non-finite values are not part of the history.
        """
        if not math.isfinite(value):
            return False, None
        self._history.append(value)
        self._steps.append(step if step is not None else (self._steps[-1] + 1 if self._steps else 0))
        score = self.score()
        if score is None:
            return False, None
        opened = self._open_score
        if score > self.threshold and (opened is None or score > _ESCALATION * opened):
            self._open_score = score
            return True, score
        if score < self.threshold * _REARM_FRACTION:
            self._open_score = None
        return False, score


@dataclass(frozen=True)
class Anomaly:
    """One flagged series: which signal, which attributes, at which step, how far off."""

    signal: str
    attributes: Mapping[str, str]
    step: int
    score: float


class AnomalyMonitor:
    """A :class:`SaxDetector` per (signal, attributes) series, created on first sight, at most ``max_series``."""

    def __init__(self, *, baseline: int = 64, window: int = 8, segments: int = 4, alphabet: int = 8,
                 threshold: float = 6.5, ignored: Iterable[str] = (), max_series: int = 1024) -> None:
        SaxDetector(baseline, window, segments, alphabet, threshold)  # validate the knobs once, up front
        self._settings = (baseline, window, segments, alphabet, threshold)
        self.threshold = threshold
        self._ignored = frozenset(ignored)
        self._max_series = max_series
        self._detectors: dict[tuple[str, tuple[tuple[str, str], ...]], SaxDetector] = {}

    def observe(self, step: int, gauges: Mapping[str, Iterable[tuple[Mapping[str, str], float]]]) -> list[Anomaly]:
        """Feed one sampled step's gauge values; the anomalies flagged at this step."""
        flagged: list[Anomaly] = []
        for signal, points in gauges.items():
            if signal in self._ignored:
                continue
            for attributes, value in points:
                key = (signal, tuple(sorted(attributes.items())))
                detector = self._detectors.get(key)
                if detector is None:
                    if len(self._detectors) >= self._max_series:
                        continue
                    detector = self._detectors[key] = SaxDetector(*self._settings)
                hit, score = detector.update(value, step)
                if hit and score is not None:
                    flagged.append(Anomaly(signal, dict(attributes), step, score))
        return flagged


def make_monitor(config: Config) -> AnomalyMonitor | None:
    """The detector ``config`` asks for; schedule- and memory-driven gauges are not judged."""
    if not config.anomaly_detection or config.is_disabled(ANOMALY_EVENTS):
        return None
    return AnomalyMonitor(baseline=config.anomaly_baseline, window=config.anomaly_window,
                          segments=config.anomaly_segments, alphabet=config.anomaly_alphabet,
                          threshold=config.anomaly_threshold,
                          ignored=(TRAIN_LEARNING_RATE, MEMORY_PRESSURE, TELEMETRY_SAMPLING_INTERVAL))
