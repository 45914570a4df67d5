"""Interceptor around ``torch.nn.functional.cross_entropy``.

Hugging Face models, ``nn.CrossEntropyLoss`` and plain scripts all look the
function up on ``torch.nn.functional`` at call time, so wrapping that attribute
sees every training loss without touching the model. The wrapper returns the
original result untouched; listeners see the raw (args, kwargs, result) and call
:func:`bind` only when they want the call, so non-sampled steps stay cheap.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CrossEntropyCall", "add_listener", "bind", "original_cross_entropy", "remove_listener"]

CrossEntropyCall = Callable[[tuple[Any, ...], dict[str, Any], torch.Tensor], None]

original_cross_entropy = F.cross_entropy
_listeners: list[CrossEntropyCall] = []
_lock = threading.Lock()


def bind(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
         size_average: bool | None = None, ignore_index: int = -100, reduce: bool | None = None,
         reduction: str = "mean", label_smoothing: float = 0.0
         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Mirror of cross_entropy's signature: (input, target, normalised options)."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    return input, target, {"weight": weight, "ignore_index": ignore_index, "reduction": reduction,
                           "label_smoothing": label_smoothing}


@functools.wraps(original_cross_entropy)
def _intercepted(*args: Any, **kwargs: Any) -> torch.Tensor:
    result = original_cross_entropy(*args, **kwargs)
    listeners = _listeners
    if listeners and torch.is_grad_enabled():
        for listener in listeners:
            listener(args, kwargs, result)
    return result


def add_listener(listener: CrossEntropyCall) -> None:
    """Start delivering cross_entropy calls to ``listener``; installs the wrapper on first use."""
    global _listeners
    with _lock:
        _listeners = [*_listeners, listener]
        F.cross_entropy = _intercepted


def remove_listener(listener: CrossEntropyCall) -> None:
    """Stop delivering to ``listener``; the last removal restores the original function."""
    global _listeners
    with _lock:
        _listeners = [item for item in _listeners if item != listener]  # bound methods compare by ==
        if not _listeners and F.cross_entropy is _intercepted:
            F.cross_entropy = original_cross_entropy
