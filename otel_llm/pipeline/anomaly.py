"""Anomaly detection over each gauge series' recent sampled history.

A series' score is the larger of two distances, both in units of how much the
series itself varies:

* **shape** (:mod:`otel_llm.pipeline.sax`): the SAX distance of the last
  ``window`` values to the ``baseline`` values before them, after the best of
  three explanations of the baseline (mean, line over steps, line over
  log(1 + step)); slow drifts and level shifts;
* **jump**: the newest value's distance from a straight line through the
  previous ``window`` values (over training steps), over the spread of the
  series' earlier such forecast errors: the larger of the median absolute
  deviation (x1.4826) of the last ``max(window, baseline // 2)`` errors and of
  the last ``window`` errors made over at least the current sampling interval.
  It is judged once ``window`` errors at that interval exist, so a longer
  sampling interval (the adaptive sampler's) first gathers its own errors.

The catalog's :class:`~otel_llm.catalog.AnomalyProfile` of a signal says how a
healthy run moves it: positive scales are judged on log(value), and neither
spread is taken below the profile's floor, because a learning model changes its
signals for real (attention sharpening, the loss halving, the update ratio
following the schedule) far beyond their step-to-step noise. Gauges without a
profile (learning rate, memory pressure, the sampling interval) are not judged.

A series is judged once ``baseline + window`` finite values are in. It flags
once when its score rises above ``threshold`` and re-arms when the score falls
below half of it, so a lasting shift is one event; a score ten times the one
that opened the event (a blow-up on top of a drift) is a new event. A
non-finite value after finite ones scores infinity (the run diverged or a
batch was poisoned); it is not kept in the history. Pure numpy on the exporter
thread; memory is bounded by ``max_series`` series of ``2 * (baseline + window)
+ 2 * max(window, baseline // 2)`` numbers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from otel_llm.catalog import ANOMALY_EVENTS, CATALOG, AnomalyProfile
from otel_llm.config import Config
from otel_llm.pipeline.sax import SaxShape

__all__ = ["GENERIC", "Anomaly", "AnomalyMonitor", "SaxDetector", "catalog_profiles", "make_monitor"]

GENERIC = AnomalyProfile(log=False, spread_floor=0.0, jump_floor=0.0)
"""A series with no domain knowledge: judged as is, spreads from the data alone."""

_REARM_FRACTION = 0.5
_ESCALATION = 10.0
_MAD_TO_SIGMA = 1.4826


def _median(values: list[float]) -> float:
    ordered = sorted(values)  # a few dozen numbers: plain Python beats numpy's call overhead here
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def _mad(values: list[float]) -> float:
    centre = _median(values)
    return _MAD_TO_SIGMA * _median([abs(v - centre) for v in values])


class SaxDetector:
    """One series: feed sampled values with :meth:`update`; it answers whether it flags and the score."""

    def __init__(self, baseline: int = 64, window: int = 8, segments: int = 8, alphabet: int = 8,
                 threshold: float = 6.5, profile: AnomalyProfile = GENERIC) -> None:
        if not threshold > 0:
            raise ValueError(f"the anomaly threshold must be > 0, got {threshold}")
        self._shape = SaxShape(baseline, window, segments, alphabet)
        self.window, self.threshold, self.profile = window, threshold, profile
        self._values: deque[float] = deque(maxlen=baseline + window)
        self._steps: deque[int] = deque(maxlen=baseline + window)
        self._errors: deque[tuple[int, float]] = deque(maxlen=max(window, baseline // 2))
        """(sampling interval, forecast error) of the latest values."""
        self._jump: float | None = None
        self._open_score: float | None = None

    def shape_score(self) -> float | None:
        """The SAX distance of the recent window to the baseline; None until the history is full."""
        if len(self._values) < self._values.maxlen:  # type: ignore[operator]
            return None
        values = np.fromiter(self._values, dtype=np.float64, count=len(self._values))
        steps = np.fromiter(self._steps, dtype=np.float64, count=len(self._steps))
        return self._shape.score(values, steps, self.profile.spread_floor)

    def jump_score(self) -> float | None:
        """The latest value's forecast error over the series' error spread; None while not judged."""
        return self._jump

    def score(self) -> float | None:
        """The larger of the shape and the jump score; None until the history is full."""
        shape = self.shape_score()
        if shape is None:
            return None
        return shape if self._jump is None else max(shape, self._jump)

    def update(self, value: float, step: int | None = None) -> tuple[bool, float | None]:
        """Add the value sampled at ``step`` (default: one after the last); (flagged now, score).

        On a log-scale profile a value <= 0 is skipped; a non-finite value scores inf once values came in.
        """
        if not math.isfinite(value):
            return (self._decide(math.inf), math.inf) if self._values else (False, None)
        if self.profile.log:
            if value <= 0:
                return False, None
            value = math.log(value)
        at = step if step is not None else (self._steps[-1] + 1 if self._steps else 0)
        self._jump = self._forecast_error(value, at)
        self._values.append(value)
        self._steps.append(at)
        score = self.score()
        return (self._decide(score), score) if score is not None else (False, None)

    def _forecast_error(self, value: float, step: int) -> float | None:
        """Score ``value`` against the line through the last ``window`` values, then keep its error."""
        if len(self._values) < self.window:
            return None
        recent = np.fromiter(self._values, dtype=np.float64)[-self.window:]
        at = np.fromiter(self._steps, dtype=np.float64)[-self.window:]
        offsets = at - at.mean()
        slope = float((offsets * (recent - recent.mean())).sum() / max(float((offsets * offsets).sum()), 1e-300))
        error = value - (recent.mean() + slope * (step - at.mean()))
        interval = max(step - int(at[-1]), 1)
        matched = [e for gap, e in self._errors if gap >= interval]
        score = None
        if len(matched) >= self.window:
            spread = max(_mad([e for _, e in self._errors]), _mad(matched[-self.window:]), self.profile.jump_floor,
                         1e-9 * abs(value), 1e-300)
            score = abs(error) / spread
        self._errors.append((interval, error))
        return score

    def _decide(self, score: float) -> bool:
        """Hysteresis: flag on crossing the threshold (or a tenfold escalation), re-arm below half of it."""
        opened = self._open_score
        if score > self.threshold and (opened is None or score > _ESCALATION * opened):
            self._open_score = score
            return True
        if score < self.threshold * _REARM_FRACTION:
            self._open_score = None
        return False


@dataclass(frozen=True)
class Anomaly:
    """One flagged series: which signal, which attributes, at which step, how far off."""

    signal: str
    attributes: Mapping[str, str]
    step: int
    score: float


class AnomalyMonitor:
    """A :class:`SaxDetector` per (signal, attributes) series of the profiled signals, at most ``max_series``."""

    def __init__(self, *, profiles: Mapping[str, AnomalyProfile], baseline: int = 64, window: int = 8,
                 segments: int = 8, alphabet: int = 8, threshold: float = 6.5, max_series: int = 1024) -> None:
        SaxDetector(baseline, window, segments, alphabet, threshold)  # validate the knobs once, up front
        self._settings = (baseline, window, segments, alphabet, threshold)
        self.threshold = threshold
        self._profiles = dict(profiles)
        self._max_series = max_series
        self._detectors: dict[tuple[str, tuple[tuple[str, str], ...]], SaxDetector] = {}

    def observe(self, step: int, gauges: Mapping[str, Iterable[tuple[Mapping[str, str], float]]]) -> list[Anomaly]:
        """Feed one sampled step's gauge values (non-finite ones included); the anomalies flagged at this step."""
        flagged: list[Anomaly] = []
        for signal, points in gauges.items():
            profile = self._profiles.get(signal)
            if profile is None:
                continue
            for attributes, value in points:
                key = (signal, tuple(sorted(attributes.items())))
                detector = self._detectors.get(key)
                if detector is None:
                    if len(self._detectors) >= self._max_series:
                        continue
                    detector = self._detectors[key] = SaxDetector(*self._settings, profile=profile)
                hit, score = detector.update(value, step)
                if hit and score is not None:
                    flagged.append(Anomaly(signal, dict(attributes), step, score))
        return flagged


def catalog_profiles() -> dict[str, AnomalyProfile]:
    """Each judged catalog gauge's profile."""
    return {spec.name: spec.anomaly for spec in CATALOG if spec.anomaly is not None}


def make_monitor(config: Config) -> AnomalyMonitor | None:
    """The detector ``config`` asks for, judging the catalog gauges that have a profile."""
    if not config.anomaly_detection or config.is_disabled(ANOMALY_EVENTS):
        return None
    return AnomalyMonitor(profiles=catalog_profiles(), baseline=config.anomaly_baseline,
                          window=config.anomaly_window, segments=config.anomaly_segments,
                          alphabet=config.anomaly_alphabet, threshold=config.anomaly_threshold)
