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

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from otel_llm.probes.interception import Interception, Patch

__all__ = ["ATTENTION", "AttentionCall", "Listener", "ScoresCall", "eager_patches"]

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

_inside = threading.local()


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


def _deliver(listeners: tuple[Listener, ...], bind: Callable[[], AttentionCall | ScoresCall]) -> None:
    for listener in listeners:
        listener(bind)


def _around_softmax(call: Callable[..., Any], listeners: tuple[Listener, ...], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
    result = call(*args, **kwargs)
    input = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if (isinstance(input, torch.Tensor) and input.dim() == 4 and dim in (-1, 3)
            and not getattr(_inside, "eager", False)):
        _deliver(listeners, lambda: ScoresCall(input))
    return result


def _around_sdpa(call: Callable[..., Any], listeners: tuple[Listener, ...], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    result = call(*args, **kwargs)
    _deliver(listeners, lambda: _bind_sdpa(*args, **kwargs))
    return result


def _around_eager(call: Callable[..., Any], listeners: tuple[Listener, ...], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
    outer = getattr(_inside, "eager", False)
    _inside.eager = True
    try:
        result = call(*args, **kwargs)
    finally:
        _inside.eager = outer
    _deliver(listeners, lambda: _bind_eager(*args, **kwargs))
    return result


ATTENTION: Interception[Listener] = Interception("attention")
ATTENTION.patch(F, "scaled_dot_product_attention", _around_sdpa)
ATTENTION.patch(F, "softmax", _around_softmax)
_eager_patches: dict[int, Patch] = {}


def eager_patches(model: torch.nn.Module) -> list[Patch]:
    """Patches of ``eager_attention_forward`` in the modelling modules whose classes in ``model`` call one.

    One patch per module namespace, shared by every model and session that uses it.
    """
    found: dict[int, Patch] = {}
    for cls in {type(module) for module in model.modules()}:
        namespace = getattr(getattr(cls, "forward", None), "__globals__", None)
        if isinstance(namespace, dict) and callable(namespace.get(_EAGER)):
            key = id(namespace)
            if key not in _eager_patches:
                _eager_patches[key] = ATTENTION.patch(namespace, _EAGER, _around_eager, on_demand=True)
            found[key] = _eager_patches[key]
    return list(found.values())
