"""Where a step's wall time goes: input wait, compute, checkpoint saves; goodput; the last step's time.

Host clocks on the training thread: a step's compute runs from its first
training forward to the end of its ``optimizer.step()``; its input wait from the
end of the previous step (after otel_llm published it) to that forward. A
checkpoint save in either span is taken out of it and recorded on its own.
Goodput is compute over wall time since the previous sampled step.

The rank's mean step time over that window (input wait + compute + saves,
leaving out otel_llm's publishing, where the sampling agreement waits for the
other ranks) goes into that agreement, whose MAX makes the slowest and fastest
rank's known everywhere (no collective of its own). Gradient collectives inside
backward (DDP, FSDP) make a fast rank wait for a slow one within its compute,
so there the ranks' step times agree and the slow rank shows in its input wait.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from otel_llm.catalog import (
    TRAIN_CHECKPOINT,
    TRAIN_COMPUTE,
    TRAIN_GOODPUT,
    TRAIN_INPUT_WAIT,
    TRAIN_LAST_STEP,
)
from otel_llm.probes._checkpoint_calls import CHECKPOINT
from otel_llm.probes._forward import in_step_forward
from otel_llm.probes.base import Probe, StepValues
from otel_llm.runtime import fork

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["StepTimeProbe"]


class StepTimeProbe(Probe):
    """Splits each step's wall time and keeps the window behind goodput and the slow-rank agreement."""

    name = "step_time"
    every_step = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._ended_at: float | None = None
        self._step_ended = False
        self._forward_at: float | None = None
        self._saving = 0.0
        """Checkpoint seconds not yet taken out of an input wait or a compute span."""
        self._saves: list[float] = []
        self._input_wait: float | None = None
        self._done: list[tuple[str, float]] = []
        self._last_step: float | None = None
        self._window_start: float | None = None
        self._window_compute = 0.0
        self._window_busy = 0.0
        self._window_steps = 0
        self.window_step_seconds = math.nan
        """This rank's mean step time over the last finished window (for the slow-rank agreement)."""

    def start(self, model_known: bool) -> None:
        self.listen(CHECKPOINT, self.guarded(self._on_save))

    def attach(self, model: torch.nn.Module) -> None:
        self.hook(model.register_forward_pre_hook(self.guarded(self._on_forward)))

    def _on_save(self, seconds: float) -> None:
        if fork.forked:  # a DataLoader worker's save is not the trainer's
            return
        self._saving += seconds
        self._saves.append(seconds)

    def _on_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self._forward_at is not None or not (module.training and torch.is_grad_enabled()
                                                and in_step_forward(module)):
            return
        now = time.perf_counter()
        self._forward_at = now
        if self._window_start is None:
            self._window_start = now
        if self._ended_at is not None:
            self._input_wait = max(0.0, now - self._ended_at - self._saving)
        self._saving = 0.0

    # -- per step -----------------------------------------------------------------
    def end_step(self) -> None:
        now = time.perf_counter()
        self._last_step = time.time()
        self._step_ended = True
        if self._input_wait is not None:
            self._done.append((TRAIN_INPUT_WAIT, self._input_wait))
            self._window_busy += self._input_wait
        if self._forward_at is not None:
            compute = max(0.0, now - self._forward_at - self._saving)
            self._done.append((TRAIN_COMPUTE, compute))
            self._window_compute += compute
            self._window_busy += compute
        self._window_busy += sum(self._saves)
        self._window_steps += 1
        self._done.extend((TRAIN_CHECKPOINT, seconds) for seconds in self._saves)
        self._saves.clear()
        self._saving = 0.0
        self._input_wait = self._forward_at = None

    def begin_step(self, sampled: bool) -> None:
        super().begin_step(sampled)
        if self._step_ended:  # the previous step is published: waiting for the next batch starts now
            self._ended_at, self._step_ended = time.perf_counter(), False

    def tally(self) -> StepValues:
        """The step's spans and checkpoint saves, and the last step's Unix time (host values)."""
        values = StepValues()
        by_name: dict[str, list[float]] = {}
        for name, seconds in self._done:
            by_name.setdefault(name, []).append(seconds)
        self._done.clear()
        for name, seconds_list in by_name.items():
            values.histogram(name, np.array(seconds_list, dtype=np.float64))
        if self._last_step is not None:
            values.gauge(TRAIN_LAST_STEP, self._last_step)
            self._last_step = None
        return values

    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        """Goodput over the window since the previous sampled step; the window's mean step time for the agreement."""
        values = StepValues()
        now = time.perf_counter()
        self.window_step_seconds = math.nan
        if self._window_start is not None and now > self._window_start and self._window_steps:
            values.gauge(TRAIN_GOODPUT, min(1.0, self._window_compute / (now - self._window_start)))
            self.window_step_seconds = self._window_busy / self._window_steps
        self._window_start, self._window_compute, self._window_busy, self._window_steps = now, 0.0, 0.0, 0
        return values

    def reset(self) -> None:
        self._saves.clear()
        self._saving = 0.0
