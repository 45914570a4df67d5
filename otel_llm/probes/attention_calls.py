"""Where attention calls are seen: SDPA and transformers' eager attention.

``torch.nn.functional.scaled_dot_product_attention`` is looked up on the module
at call time by transformers' ``sdpa`` attention and by plain torch models, so
one wrapper on that attribute sees them all.

Eager attention materialises the probabilities itself. Every transformers
model since the attention-interface refactor (4.48) routes eager attention
through a module-level ``eager_attention_forward(module, query, key, value,
attention_mask, scaling, dropout, **kwargs)`` that its attention class resolves
from its module globals at call time. Wrapping that global, per modelling
module found in the model, hands the listener the same q, k, v, mask and scale
as SDPA would get, so ``eager`` and ``sdpa`` yield the same statistics,
including the head outputs behind the divergence signal.

Attention written out by hand (an explicit ``F.softmax`` over q·kᵀ, as in
nanoGPT's non-flash path or transformers releases before the interface) is
seen through a wrapper on ``torch.nn.functional.softmax``: a 4-D softmax over
the last dimension is taken as attention scores. Those give every signal but
the head divergence, which needs the values. Softmax calls made inside the
wrapped eager function are not delivered again. Every wrapper calls the
original first and returns its result untouched; listeners run afterwards and
only read the inputs.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["AttentionCall", "ScoresCall", "add_listener", "eager_globals", "original_sdpa", "original_softmax",
           "patch_eager", "remove_listener", "unpatch_eager"]

original_sdpa = F.scaled_dot_product_attention
original_softmax = F.softmax
_EAGER = "eager_attention_forward"


@dataclass(frozen=True)
class AttentionCall:
    """The inputs of one attention call, in SDPA's terms.

    ``attn_mask`` is boolean (True = may attend) or additive; K/V may have
    fewer heads than the query (grouped-query attention); ``softcap`` caps the
    logits as ``tanh(logits / softcap) * softcap`` when set (eager only).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    is_causal: bool = False
    scale: float | None = None
    softcap: float | None = None


@dataclass(frozen=True)
class ScoresCall:
    """Attention scores (B, H, queries, keys) as handed to softmax: scaled, masked additively."""

    scores: torch.Tensor


Listener = Callable[[Callable[[], "AttentionCall | ScoresCall"]], None]
"""Receives a thunk that binds the call; listeners not interested never pay for binding."""

_listeners: list[Listener] = []
_lock = threading.Lock()
_inside = threading.local()
_patched: dict[int, tuple[dict[str, Any], Callable[..., Any], int]] = {}


def _bind_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> AttentionCall:
    return AttentionCall(query, key, value, attn_mask, bool(is_causal), scale)


def _bind_eager(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                softcap: float | None = None, **kwargs: Any) -> AttentionCall:
    if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
        attention_mask = attention_mask[..., : key.shape[-2]]  # older masks span the whole cache
    return AttentionCall(query, key, value, attention_mask, False, scaling, softcap or None)


def _deliver(bind: Callable[[], AttentionCall | ScoresCall]) -> None:
    for listener in _listeners:
        listener(bind)


def _is_scores(input: Any, dim: Any) -> bool:
    return (isinstance(input, torch.Tensor) and input.dim() == 4 and dim in (-1, 3)
            and not getattr(_inside, "eager", False))


@functools.wraps(original_softmax)
def _intercepted_softmax(input: torch.Tensor, dim: int | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    result = original_softmax(input, dim, *args, **kwargs)
    if _listeners and _is_scores(input, dim):
        _deliver(lambda: ScoresCall(input))
    return result


@functools.wraps(original_sdpa)
def _intercepted_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
    result = original_sdpa(*args, **kwargs)
    if _listeners:
        _deliver(lambda: _bind_sdpa(*args, **kwargs))
    return result


def _eager_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def eager_attention_forward(*args: Any, **kwargs: Any) -> Any:
        outer = getattr(_inside, "eager", False)
        _inside.eager = True
        try:
            result = original(*args, **kwargs)
        finally:
            _inside.eager = outer
        if _listeners:
            _deliver(lambda: _bind_eager(*args, **kwargs))
        return result

    eager_attention_forward.__otel_llm_original__ = original  # type: ignore[attr-defined]
    return eager_attention_forward


def add_listener(listener: Listener) -> None:
    """Deliver attention calls to ``listener``; installs the SDPA and softmax wrappers on first use."""
    global _listeners
    with _lock:
        _listeners = [*_listeners, listener]
        F.scaled_dot_product_attention = _intercepted_sdpa
        F.softmax = _intercepted_softmax


def remove_listener(listener: Listener) -> None:
    """Stop delivering to ``listener``; the last removal restores the original functions."""
    global _listeners
    with _lock:
        _listeners = [item for item in _listeners if item != listener]
        if not _listeners and F.scaled_dot_product_attention is _intercepted_sdpa:
            F.scaled_dot_product_attention = original_sdpa
        if not _listeners and F.softmax is _intercepted_softmax:
            F.softmax = original_softmax


def eager_globals(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Globals of the modelling modules whose classes in ``model`` call an ``eager_attention_forward``."""
    found: dict[int, dict[str, Any]] = {}
    for cls in {type(module) for module in model.modules()}:
        namespace = getattr(getattr(cls, "forward", None), "__globals__", None)
        if isinstance(namespace, dict) and callable(namespace.get(_EAGER)):
            found[id(namespace)] = namespace
    return list(found.values())


def patch_eager(namespaces: list[dict[str, Any]]) -> None:
    """Wrap ``eager_attention_forward`` in each namespace (reference counted across sessions)."""
    with _lock:
        for namespace in namespaces:
            key = id(namespace)
            if key in _patched:
                ns, original, count = _patched[key]
                _patched[key] = (ns, original, count + 1)
            else:
                original = namespace[_EAGER]
                namespace[_EAGER] = _eager_wrapper(original)
                _patched[key] = (namespace, original, 1)


def unpatch_eager(namespaces: list[dict[str, Any]]) -> None:
    """Undo one :func:`patch_eager`; the last one restores the original functions."""
    with _lock:
        for namespace in namespaces:
            key = id(namespace)
            if key not in _patched:
                continue
            ns, original, count = _patched[key]
            if count > 1:
                _patched[key] = (ns, original, count - 1)
                continue
            del _patched[key]
            if getattr(ns.get(_EAGER), "__otel_llm_original__", None) is original:
                ns[_EAGER] = original
