"""The shape half of the anomaly score: SAX distance of a recent window to the baseline before it.

The history (``baseline + window`` values) is compared through its residuals
from three explanations fitted on the baseline alone: its mean, its
least-squares line over training steps, and its line over log(1 + step) (a
power-law learning curve, which bends the way loss, norms and logits do). For
each, the residuals are z-normalised by the baseline residuals' standard
deviation, never less than the signal's spread floor; every sliding window of the
baseline becomes a SAX word (PAA to ``segments`` means, Gaussian breakpoints for
an ``alphabet``-letter alphabet) and the recent window stays a real-valued PAA.
The distance is the mean, over the baseline words, of the iSAX lower bound
MINDIST(recent PAA, word) = sqrt(window / segments) * ||d||, d being each PAA
mean's distance to its letter's interval. Keeping the recent side unquantised
lets a 10 sigma move score higher than a 2 sigma one instead of both landing in
the top letter. The smallest of the three distances counts: a series that keeps
moving the way its baseline moved is not anomalous.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["SaxShape", "gaussian_breakpoints"]

_LARGEST_GAP = 1e150  # squared stays finite: a blown-up signal scores huge, not inf


def gaussian_breakpoints(alphabet: int) -> np.ndarray:
    """The ``alphabet - 1`` cut points that split N(0, 1) into equiprobable letters."""
    if alphabet < 2:
        raise ValueError(f"a SAX alphabet needs at least 2 letters, got {alphabet}")
    return np.array([NormalDist().inv_cdf(i / alphabet) for i in range(1, alphabet)])


class SaxShape:
    """The SAX distance of one history's recent window to its baseline (stateless; the arrays come in)."""

    def __init__(self, baseline: int, window: int, segments: int, alphabet: int) -> None:
        if segments < 1 or window % segments:
            raise ValueError(f"the window ({window}) must split into a whole number of segments ({segments})")
        if baseline < window:
            raise ValueError(f"the baseline ({baseline}) must be at least one window ({window}) long")
        self.baseline, self.window, self.segments = baseline, window, segments
        self._cuts = gaussian_breakpoints(alphabet)
        self._lower = np.concatenate([[-np.inf], self._cuts])
        self._upper = np.concatenate([self._cuts, [np.inf]])
        self._segment = window // segments

    def score(self, values: np.ndarray, steps: np.ndarray, floor: float) -> float:
        """The smallest distance over the three explanations of the baseline (mean, line, line in log step)."""
        base = values[: self.baseline]
        mean = base.mean()
        explained = [values - mean]
        for axis in (steps, np.log1p(np.maximum(steps, 0.0))):
            offsets = axis - axis[: self.baseline].mean()
            head = offsets[: self.baseline]
            slope = float((head * (base - mean)).sum() / max(float((head * head).sum()), 1e-300))
            explained.append(values - mean - slope * offsets)
        return float(self.distances(np.stack(explained), floor).min())

    def distances(self, residuals: np.ndarray, floor: float) -> np.ndarray:
        """Per row: mean MINDIST(recent PAA, baseline word) of residuals z-normalised by max(baseline spread, floor)."""
        spread = np.maximum.reduce([residuals[:, : self.baseline].std(axis=1), np.full(len(residuals), floor),
                                    1e-9 * np.abs(residuals).max(axis=1), np.full(len(residuals), 1e-300)])
        z = residuals / spread[:, None]
        recent = z[:, self.baseline:].reshape(len(z), self.segments, -1).mean(axis=2)
        # each baseline word's PAA read off the segment means at every offset: views, no baseline x window copy
        means = sliding_window_view(z[:, : self.baseline], self._segment, axis=1).mean(axis=2)
        words = sliding_window_view(means, (self.segments - 1) * self._segment + 1, axis=1)[:, :, :: self._segment]
        letters = np.searchsorted(self._cuts, words)
        lower, upper = self._lower[letters], self._upper[letters]
        recent = recent[:, None, :]
        gap = np.where(recent < lower, lower - recent, np.where(recent > upper, recent - upper, 0.0))
        gap = np.minimum(gap, _LARGEST_GAP)
        return math.sqrt(self.window / self.segments) * np.sqrt((gap * gap).sum(axis=2)).mean(axis=1)
