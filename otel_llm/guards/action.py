"""What a guard did, as the log line, the log record and the ``on_guard`` callbacks receive it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["GuardAction", "GuardListener"]


@dataclass(frozen=True)
class GuardAction:
    """One action: which guard, at which optimizer step, why, and the values that triggered it."""

    action: str
    """``skip_nonfinite``, ``lr_backoff`` or ``clip_on_rebound`` (the ``llm.guard.action`` attribute)."""
    step: int
    reason: str
    values: Mapping[str, float]

    def describe(self) -> str:
        """The action as one line of text: the guard, the step, the reason and the values."""
        shown = ", ".join(f"{key}={value:.6g}" for key, value in self.values.items())
        return f"guard {self.action} at step {self.step}: {self.reason}" + (f" ({shown})" if shown else "")


GuardListener = Callable[[GuardAction], None]
"""A user callback (``Instrumentation.on_guard``): runs on the training thread, after the action."""
