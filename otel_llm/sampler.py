"""Which optimizer steps compute the expensive signals.

The decision is a pure function of the step index (and, for adaptive policies,
of inputs every rank agrees on), so every data-parallel rank samples the same
steps and no rank ever enters a telemetry collective the others skip.
"""

from __future__ import annotations

__all__ = ["FixedIntervalSampler", "Sampler", "make_sampler"]


class Sampler:
    """Interface: ``is_sampled(step)`` must be answerable before the step's forward pass."""

    interval: int

    def is_sampled(self, step: int) -> bool:
        raise NotImplementedError


class FixedIntervalSampler(Sampler):
    """Steps 0, N, 2N, ... are sampled."""

    def __init__(self, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"sampling interval must be >= 1, got {interval}")
        self.interval = interval

    def is_sampled(self, step: int) -> bool:
        return step % self.interval == 0


def make_sampler(policy: str, interval: int) -> Sampler:
    """The sampler for a policy name; ``adaptive`` follows the fixed schedule for now."""
    if policy not in ("fixed", "adaptive"):
        raise ValueError(f"unknown sampling policy {policy!r}")
    return FixedIntervalSampler(interval)
