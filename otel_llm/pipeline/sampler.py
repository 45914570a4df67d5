"""Which optimizer steps compute the expensive signals.

``is_sampled(step)`` must be answerable before the step's forward pass, so it
depends only on the sampler's state. Adaptive state changes only in ``update``,
called at the end of a sampled step with inputs every rank agrees on; every
data-parallel rank therefore samples the same steps and no rank ever enters a
telemetry collective the others skip.

The agreement: every rank encodes [loss, non-finite flag, anomaly flag, memory
pressure, step time, -step time, decay rate, -decay rate] of its sampled step into a device vector
(:meth:`SamplingInputs.encode`); one MAX all-reduce makes it equal everywhere,
and the vector then rides along in the step's single device-to-host transfer,
so agreeing costs no extra sync; :meth:`SamplingInputs.decode` reads it back.
The step times give the slowest and the fastest rank's step time for free; the
guards (:mod:`otel_llm.guards`) read the decay rates: the highest and the lowest over ranks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from otel_llm.catalog import GRAD_NORM, GRAD_NORM_DECAY_RATE, MEMORY_PRESSURE, TRAIN_LOSS
from otel_llm.probes.base import StepValues
from otel_llm.runtime.rank import data_parallel_world

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["AdaptiveSampler", "FixedIntervalSampler", "Sampler", "SamplingInputs", "make_sampler"]


@dataclass(frozen=True)
class SamplingInputs:
    """What a sampled step tells the adaptive policy, already agreed across ranks.

    ``loss`` is the largest finite per-rank loss (NaN when none is known),
    ``memory_pressure`` the largest per-rank pressure (0 when unknown);
    ``slowest_step`` / ``fastest_step`` the largest / smallest per-rank mean step
    time (NaN when no rank knows one);
    ``decay_high`` / ``decay_low`` the highest / lowest finite per-rank gradient-norm
    decay rate (None when no rank measured one).
    """

    loss: float = math.nan
    nonfinite: bool = False
    anomaly: bool = False
    memory_pressure: float = 0.0
    slowest_step: float = math.nan
    fastest_step: float = math.nan
    decay_high: float | None = None
    decay_low: float | None = None

    @staticmethod
    def encode(values: StepValues, anomalies: int, device: torch.device,
               step_seconds: float = math.nan) -> torch.Tensor:
        """This rank's inputs as a vector on ``device``, all-reduced (MAX) across data-parallel ranks."""
        loss = _on_device(values.first(TRAIN_LOSS), device)
        norm = _on_device(values.first(GRAD_NORM), device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        for value in (loss, norm):
            if value is not None:
                nonfinite = nonfinite | ~torch.isfinite(value)
        if loss is None:
            agreed_loss = torch.full((), float("-inf"), dtype=torch.float64, device=device)
        else:
            agreed_loss = torch.where(torch.isfinite(loss), loss, float("-inf"))
        pressure = values.first(MEMORY_PRESSURE)
        known = math.isfinite(step_seconds)
        flags = torch.tensor([float(anomalies > 0), float(pressure or 0.0),
                              step_seconds if known else -math.inf, -step_seconds if known else -math.inf],
                             dtype=torch.float64).to(device)
        decay = _on_device(values.first(GRAD_NORM_DECAY_RATE), device)
        if decay is None:
            decays = torch.full((2,), float("-inf"), dtype=torch.float64, device=device)
        else:
            decays = torch.where(torch.isfinite(decay), torch.stack([decay, -decay]), float("-inf"))
        vector = torch.cat([agreed_loss.reshape(1), nonfinite.double().reshape(1), flags, decays.reshape(2)])
        if data_parallel_world() > 1:
            import torch.distributed as dist

            dist.all_reduce(vector, op=dist.ReduceOp.MAX)
        return vector

    @classmethod
    def decode(cls, vector: np.ndarray) -> SamplingInputs:
        """The agreed inputs from the host copy of :meth:`encode`'s vector (-inf loss: none finite)."""
        loss, nonfinite, anomaly, pressure, slowest, negated_fastest, high, negated_low = (
            float(v) for v in vector[:8])
        return cls(loss if math.isfinite(loss) else math.nan, nonfinite > 0, anomaly > 0, max(pressure, 0.0),
                   slowest if math.isfinite(slowest) else math.nan,
                   -negated_fastest if math.isfinite(negated_fastest) else math.nan,
                   high if math.isfinite(high) else None, -negated_low if math.isfinite(negated_low) else None)


def _on_device(value: torch.Tensor | float | None, device: torch.device) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, torch.float64)
    return torch.tensor(float(value), dtype=torch.float64).to(device)


class Sampler:
    """Interface: ``is_sampled(step)``; ``update`` after each sampled step when ``adaptive``."""

    interval: int
    adaptive = False

    def is_sampled(self, step: int) -> bool:
        raise NotImplementedError

    def update(self, step: int, inputs: SamplingInputs) -> None:
        """Take the agreed inputs of sampled ``step``; fixed policies ignore them."""


class FixedIntervalSampler(Sampler):
    """Steps 0, N, 2N, ... are sampled."""

    def __init__(self, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"sampling interval must be >= 1, got {interval}")
        self.interval = interval

    def is_sampled(self, step: int) -> bool:
        return step % self.interval == 0


class AdaptiveSampler(Sampler):
    """Dense sampling during warm-up, then an interval that grows with quiet steps and snaps back on trouble.

    After sampled step ``t`` the next sampled step is ``t + interval`` where, in order of precedence:

    - warm-up (``t + 1 < warmup``): interval ``floor(min_interval * (t + 1) / warmup)``, at least 1:
      every step for the first ``2 * warmup / min_interval`` steps (20 of the default 100), then
      growing linearly to ``min_interval`` (about 38 sampled steps in the default warm-up instead of
      100: early training stays covered at a third of the cost);
    - a loss spike, a non-finite loss/gradient norm or an anomaly: interval ``min_interval``,
      and the growth clock restarts at ``t``;
    - otherwise ``base = min_interval * 2 ** ((t - start) // growth_steps)`` (``start``: the end
      of warm-up or the last tightening), doubled on a loss plateau, doubled again when
      memory pressure exceeds ``memory_limit``, capped at ``max_interval``.

    A spike is a loss above ``mean + spike_sigma * max(std, 1% of |mean|)`` of the previous
    ``loss_window`` sampled losses (at least half a window of them); a plateau is a full
    window whose standard deviation is below ``plateau_tolerance * |mean|``.
    """

    adaptive = True

    def __init__(self, *, warmup: int = 100, min_interval: int = 10, max_interval: int = 100,
                 growth_steps: int = 1000, loss_window: int = 20, spike_sigma: float = 4.0,
                 plateau_tolerance: float = 0.01, memory_limit: float = 0.85) -> None:
        if warmup < 0 or min_interval < 1 or growth_steps < 1 or loss_window < 2:
            raise ValueError("adaptive sampling needs warmup >= 0, min_interval >= 1, growth_steps >= 1 "
                             f"and loss_window >= 2 (got {warmup}, {min_interval}, {growth_steps}, {loss_window})")
        if max_interval < min_interval:
            raise ValueError(f"max_interval ({max_interval}) must be >= min_interval ({min_interval})")
        self.warmup, self.min_interval, self.max_interval = warmup, min_interval, max_interval
        self.growth_steps, self.spike_sigma = growth_steps, spike_sigma
        self.plateau_tolerance, self.memory_limit = plateau_tolerance, memory_limit
        self.interval = 1 if warmup > 0 else min_interval
        self.reason = "warm-up" if warmup > 0 else "growth"
        self._next = 0
        self._start = warmup
        self._losses: deque[float] = deque(maxlen=loss_window)

    def is_sampled(self, step: int) -> bool:
        return step == self._next

    def update(self, step: int, inputs: SamplingInputs) -> None:
        spike = self._is_spike(inputs.loss)
        if math.isfinite(inputs.loss):
            self._losses.append(inputs.loss)
        if spike or inputs.nonfinite or inputs.anomaly:
            self._start = step
        if step + 1 < self.warmup:
            self._decide(step, max(1, self.min_interval * (step + 1) // self.warmup), "warm-up")
        elif spike or inputs.nonfinite or inputs.anomaly:
            reason = "loss spike" if spike else "non-finite value" if inputs.nonfinite else "anomaly"
            self._decide(step, self.min_interval, reason)
        else:
            doublings = max(0, step - max(self._start, self.warmup)) // self.growth_steps
            interval = self.min_interval * 2 ** min(doublings, 62)
            reasons = ["growth"]
            if self._is_plateau():
                interval, reasons = interval * 2, reasons + ["plateau"]
            if inputs.memory_pressure > self.memory_limit:
                interval, reasons = interval * 2, reasons + ["memory pressure"]
            self._decide(step, min(interval, self.max_interval), " + ".join(reasons))

    def _decide(self, step: int, interval: int, reason: str) -> None:
        self.interval, self.reason, self._next = interval, reason, step + interval

    def _is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss) or len(self._losses) < max(2, self._losses.maxlen // 2):  # type: ignore[operator]
            return False
        history = np.fromiter(self._losses, dtype=np.float64)
        mean = float(history.mean())
        return loss > mean + self.spike_sigma * max(float(history.std()), 0.01 * abs(mean))

    def _is_plateau(self) -> bool:
        if len(self._losses) < self._losses.maxlen:  # type: ignore[operator]
            return False
        history = np.fromiter(self._losses, dtype=np.float64)
        return float(history.std()) < self.plateau_tolerance * abs(float(history.mean()))


def make_sampler(config: Config) -> Sampler:
    """The sampler ``config`` asks for."""
    if config.sampling == "fixed":
        return FixedIntervalSampler(config.sampling_interval)
    return AdaptiveSampler(
        warmup=config.sampling_warmup, min_interval=config.sampling_min_interval,
        max_interval=config.sampling_max_interval, growth_steps=config.sampling_growth_steps,
        loss_window=config.sampling_loss_window, spike_sigma=config.sampling_spike_sigma,
        plateau_tolerance=config.sampling_plateau_tolerance, memory_limit=config.sampling_memory_limit)
