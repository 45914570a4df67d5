"""When the gradient-norm decay rate asks for a learning-rate backoff or for clipping.

Both policies see one value per sampled step, already agreed across ranks (the
highest rank's decay rate for the backoff, the lowest for clipping), so every
rank takes the same decision at the same step. A sampled step without a finite
decay rate breaks a streak: "K consecutive sampled steps" means K measured ones.
"""

from __future__ import annotations

__all__ = ["ClipOnRebound", "LrBackoff"]


class LrBackoff:
    """Back off after ``patience`` consecutive sampled decay rates above ``threshold``.

    After a backoff at step t, the sampled steps up to ``t + cooldown`` are not
    counted; the product of all backoffs (:attr:`scale`) never goes below ``floor``.
    """

    def __init__(self, threshold: float, patience: int, factor: float, cooldown: int, floor: float) -> None:
        self.threshold, self.patience, self.factor = threshold, patience, factor
        self.cooldown, self.floor = cooldown, floor
        self.scale = 1.0
        """The product of the backoffs taken so far."""
        self.streak = 0
        self._quiet_until = -1

    def observe(self, step: int, decay: float | None) -> float | None:
        """The agreed decay rate of sampled ``step``; the factor to apply now, or None."""
        if step <= self._quiet_until:
            return None
        self.streak = self.streak + 1 if decay is not None and decay > self.threshold else 0
        if self.streak < self.patience or self.scale <= self.floor:
            return None
        factor = max(self.factor, self.floor / self.scale)
        self.scale *= factor
        self.streak = 0
        self._quiet_until = step + self.cooldown
        return factor


class ClipOnRebound:
    """Clip the ``steps`` optimizer steps after ``patience`` consecutive sampled decay rates below ``threshold``.

    Sampled steps inside a clipping window are not counted: a window is not
    extended, and a new one can open only after it has ended.
    """

    def __init__(self, threshold: float, patience: int, steps: int) -> None:
        self.threshold, self.patience, self.steps = threshold, patience, steps
        self.streak = 0
        self._window: tuple[int, int] | None = None
        """(first, last) optimizer step clipped."""

    def observe(self, step: int, decay: float | None) -> bool:
        """The agreed decay rate of sampled ``step``; True when a clipping window opens after it."""
        if self._window is not None and step <= self._window[1]:
            return False
        self.streak = self.streak + 1 if decay is not None and decay < self.threshold else 0
        if self.streak < self.patience:
            return False
        self.streak = 0
        self._window = (step + 1, step + self.steps)
        return True

    @property
    def window(self) -> tuple[int, int] | None:
        """The optimizer steps the latest trigger clips, first and last."""
        return self._window

    def clips(self, step: int) -> bool:
        """Whether optimizer step ``step``'s gradients are clipped."""
        return self._window is not None and self._window[0] <= step <= self._window[1]
