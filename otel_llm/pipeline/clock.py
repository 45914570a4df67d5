"""The step clock: optimizer-step boundaries and which steps are sampled.

A step is the span between two optimizer steps. Whether step t is sampled is
known before its forward pass (the sampler depends only on what earlier
sampled steps told it), so hooks can decide at no cost whether to measure.
"""

from __future__ import annotations

import time

from otel_llm.pipeline.sampler import Sampler
from otel_llm.probes.base import StepPlan

__all__ = ["StepClock"]


class StepClock:
    """Counts optimizer steps, asks the sampler about each, and times the span between two."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.step = 0
        """Optimizer steps completed."""
        self.sampled = sampler.is_sampled(0)
        """Whether the current step computes the expensive signals."""
        self._last_end: float | None = None

    def plan(self) -> StepPlan:
        """What the optimizer pre-step needs: this step's and the next step's sampling decisions."""
        return StepPlan(self.step, self.sampled, self.sampler.is_sampled(self.step + 1))

    def durations(self, now: float) -> list[float]:
        """Wall time since the previous step ended (none before the first step)."""
        return [now - self._last_end] if self._last_end is not None else []

    def advance(self) -> bool:
        """Move to the next step; returns whether it is sampled."""
        self.step += 1
        self.sampled = self.sampler.is_sampled(self.step)
        return self.sampled

    def mark_end(self) -> None:
        """The step's telemetry is done: the next duration starts now."""
        self._last_end = time.perf_counter()
