"""The guards of one session: what they do at each optimizer step and after each sampled step.

Per step (optimizer pre-step, training thread): ``skip_nonfinite`` reads one
flag from the device and withholds the gradients when they hold NaN/Inf;
``clip_on_rebound`` clips the gradients inside an open window. After a sampled
step, ``lr_backoff`` and ``clip_on_rebound`` decide from the decay rate agreed
through the sampling collective (:class:`~otel_llm.pipeline.sampler.SamplingInputs`),
so every rank acts at the same step. Each action is one log line, one
``llm.guard.actions`` count, an OTel log record where logs are exported, and a
call of every ``on_guard`` callback.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch

from otel_llm.catalog import ATTR_GUARD_ACTION, GUARD_ACTIONS, TRAIN_SKIPPED_STEPS
from otel_llm.guards.action import GuardAction, GuardListener
from otel_llm.guards.nonfinite import Withheld, has_nonfinite
from otel_llm.guards.policy import ClipOnRebound, LrBackoff
from otel_llm.pipeline.transfer import CounterPoint
from otel_llm.probes._clip_calls import CLIP, ClipCall
from otel_llm.probes._wrappers import innermost_optimizer
from otel_llm.probes.optimizer import trainable_params
from otel_llm.runtime.log_once import once

if TYPE_CHECKING:
    from otel_llm.config import Config
    from otel_llm.pipeline.sampler import SamplingInputs

__all__ = ["Guards", "make_guards"]

_logger = logging.getLogger("otel_llm.guards")


def _scaled(value: Any, factor: float) -> Any:
    """``value`` times ``factor``: a tensor in place (a capturable optimizer's lr), a number anew."""
    if isinstance(value, torch.Tensor):
        return value.mul_(factor)
    if isinstance(value, Real):
        return float(value) * factor
    return value


class Guards:
    """The enabled guards of one session (built only when ``config.guards`` names one)."""

    def __init__(self, config: Config, record: Callable[[GuardAction], None] | None = None) -> None:
        enabled = set(config.guards)
        self._skip = "skip_nonfinite" in enabled
        self._backoff = LrBackoff(config.guard_lr_backoff_threshold, config.guard_lr_backoff_patience,
                                  config.guard_lr_backoff_factor, config.guard_lr_backoff_cooldown,
                                  config.guard_lr_backoff_floor) if "lr_backoff" in enabled else None
        self._clip = ClipOnRebound(config.guard_clip_threshold, config.guard_clip_patience,
                                   config.guard_clip_steps) if "clip_on_rebound" in enabled else None
        self._max_norm = config.guard_clip_max_norm
        self._record = record
        self._listeners: list[GuardListener] = []
        self._schedulers: list[weakref.ref[Any]] = []
        self._withheld: Withheld | None = None
        self._loop_clips = False
        self._own_clip = False
        if self._clip is not None:
            CLIP.add_listener(self._on_clip)
        if self._skip:
            _logger.info("otel_llm: skip_nonfinite reads one flag from the device at every optimizer step "
                         "(a host decision per step; the other guards act on sampled steps only)")

    @property
    def needs_decision(self) -> bool:
        """Whether a guard decides on sampled steps (then the agreement vector is built even for fixed sampling)."""
        return self._backoff is not None or self._clip is not None

    def add_listener(self, listener: GuardListener) -> None:
        self._listeners.append(listener)

    def follow_scheduler(self, scheduler: Any) -> None:
        """A learning-rate scheduler whose base rates a backoff scales too (kept weakly)."""
        if scheduler is not None and all(ref() is not scheduler for ref in self._schedulers):
            self._schedulers = [ref for ref in self._schedulers if ref() is not None] + [weakref.ref(scheduler)]

    def close(self) -> None:
        if self._clip is not None:
            CLIP.remove_listener(self._on_clip)
        if self._withheld is not None:
            self._withheld.restore()
            self._withheld = None

    # -- every step -----------------------------------------------------------------
    def before_update(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Optimizer pre-step: withhold a non-finite update, or clip inside an open window."""
        if self._withheld is not None:  # the same update's gradients read again (an explicit read_gradients)
            return
        params = [p for p in trainable_params(optimizer) if p.grad is not None]
        if not params:
            return
        if self._skip and has_nonfinite([p.grad for p in params if p.grad is not None]):
            self._withheld = Withheld(params)
            self._act(GuardAction("skip_nonfinite", step, "the gradients hold NaN/Inf: the update is not applied",
                                  {}))
            return
        if self._clip is not None and self._clip.clips(step) and not self._loop_clips:
            self._own_clip = True
            try:
                torch.nn.utils.clip_grad_norm_(params, self._max_norm)  # looked up now: the probes see the call
            finally:
                self._own_clip = False

    def after_update(self) -> list[CounterPoint] | None:
        """Optimizer post-step: the counters of a withheld update (it is no training step), else None."""
        withheld, self._withheld = self._withheld, None
        if withheld is None:
            return None
        withheld.restore()
        return [(TRAIN_SKIPPED_STEPS, {}, 1), (GUARD_ACTIONS, {ATTR_GUARD_ACTION: "skip_nonfinite"}, 1)]

    def _on_clip(self, clip: ClipCall) -> None:
        if self._own_clip or self._loop_clips:
            return
        self._loop_clips = True
        _logger.info("otel_llm: the training loop clips its gradients; clip_on_rebound leaves them to it")

    # -- sampled steps ----------------------------------------------------------------
    def decide(self, step: int, inputs: SamplingInputs, optimizer: torch.optim.Optimizer) -> list[CounterPoint]:
        """After sampled ``step``: act on the agreed decay rates; the counters of the actions taken."""
        counters: list[CounterPoint] = []
        if self._backoff is not None:
            factor = self._backoff.observe(step, inputs.decay_high)
            if factor is not None:
                lr = self._scale_learning_rates(optimizer, factor)
                values = {"decay_rate": float(inputs.decay_high or 0.0), "threshold": self._backoff.threshold,
                          "factor": factor, "scale": self._backoff.scale}
                if lr is not None:
                    values["learning_rate"] = lr
                self._act(GuardAction("lr_backoff", step, f"the gradient-norm decay rate stayed above the threshold "
                                      f"for {self._backoff.patience} sampled steps: learning rates x{factor:g}",
                                      values))
                counters.append((GUARD_ACTIONS, {ATTR_GUARD_ACTION: "lr_backoff"}, 1))
            elif self._backoff.scale <= self._backoff.floor and self._backoff.streak >= self._backoff.patience:
                once(_logger, logging.WARNING, ("guard floor", id(self)),
                     "otel_llm: lr_backoff reached its floor (x%g); the learning rate is not lowered further",
                     self._backoff.floor)
        if self._clip is not None and not self._loop_clips and self._clip.observe(step, inputs.decay_low):
            first, last = self._clip.window or (step + 1, step + self._clip.steps)
            self._act(GuardAction("clip_on_rebound", step, f"the gradient-norm decay rate stayed below the threshold "
                                  f"for {self._clip.patience} sampled steps: clipping steps {first}-{last}",
                                  {"decay_rate": float(inputs.decay_low or 0.0), "threshold": self._clip.threshold,
                                   "max_norm": self._max_norm, "steps": float(self._clip.steps)}))
            counters.append((GUARD_ACTIONS, {ATTR_GUARD_ACTION: "clip_on_rebound"}, 1))
        return counters

    def _scale_learning_rates(self, optimizer: torch.optim.Optimizer, factor: float) -> float | None:
        """Every group's rate, and the base rates of the schedulers that drive it, times ``factor``.

        Scaling a scheduler's ``base_lrs`` with the current rates makes the rest of
        its schedule the original one times ``factor``, closed-form (LambdaLR, the
        Hugging Face schedules) and recursive (cosine, step) alike.
        """
        for group in optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] = _scaled(group[key], factor)
        for ref in self._schedulers:
            scheduler = ref()
            if scheduler is None or innermost_optimizer(getattr(scheduler, "optimizer", None)) is not optimizer:
                continue
            if isinstance(getattr(scheduler, "base_lrs", None), list):
                scheduler.base_lrs = [_scaled(base, factor) for base in scheduler.base_lrs]
            if isinstance(getattr(scheduler, "_last_lr", None), list):
                scheduler._last_lr = [_scaled(last, factor) for last in scheduler._last_lr]
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        return float(lr) if isinstance(lr, (Real, torch.Tensor)) else None

    def _act(self, action: GuardAction) -> None:
        _logger.warning("otel_llm: %s", action.describe())
        for sink in ([self._record] if self._record is not None else []) + self._listeners:
            try:
                sink(action)
            except Exception:  # noqa: BLE001 - a callback must not stop the training step
                once(_logger, logging.WARNING, ("guard callback", id(sink)),
                     "otel_llm: an on_guard callback raised; it keeps being called", exc_info=True)


def make_guards(config: Config, record: Callable[[GuardAction], None] | None = None) -> Guards | None:
    """The guards ``config`` enables, or None (then no step does any guard work)."""
    return Guards(config, record) if config.guards else None
