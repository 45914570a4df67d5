"""Where gradient clipping is seen: the clip calls people use, and the norm each one computed.

The optimizer pre-step sees gradients after clipping, so a norm taken there is
capped at the clip's bound and cannot show the explosions it exists to show.
The clip calls compute the pre-clip norm anyway and return it as a device
tensor; the listener gets it without a host sync. Patched on
``torch.nn.utils`` (looked up at call time by nanoGPT, accelerate and so the
Hugging Face Trainer, and plain scripts):

* ``clip_grad_norm_`` / ``clip_grad_norm``: the returned total norm;
* ``clip_grads_with_norm_`` (after ``get_total_norm``, accelerate's mixed-mesh
  path): the ``total_norm`` it is given;

FSDP's ``FullyShardedDataParallel.clip_grad_norm_``, and DeepSpeed's own
``clip_grad_norm_`` where its engine clips an fp32 stage-0 run (the ZeRO and
fp16/bf16 wrappers clip inside their ``step()``: see
:mod:`otel_llm.probes._deepspeed`). Only the outermost
clip call is delivered, so an implementation built on another one is not seen twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.utils

from otel_llm.probes.interception import Interception

__all__ = ["CLIP", "ClipCall", "ClipListener"]


@dataclass(frozen=True)
class ClipCall:
    """One clip: the pre-clip total norm, the bound, the norm type and which parameters it covered."""

    total_norm: torch.Tensor
    max_norm: float
    norm_type: float
    parameters: frozenset[int]
    """ids of the parameters with a gradient (empty when the call does not say: FSDP's covers the whole model)."""

    @property
    def scaled(self) -> torch.Tensor:
        """Whether the clip scaled the gradients down (torch's own rule: max_norm / (norm + 1e-6) < 1), on device."""
        return self.total_norm.detach() + 1e-6 > self.max_norm


ClipListener = Callable[[ClipCall], None]

_inside = threading.local()


def _materialised(parameters: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[frozenset[int], tuple[Any, ...], dict[str, Any]]:
    """ids of the parameters with a gradient, and the call's arguments with a generator turned into a list.

    The call would consume a generator; reading it first must not leave the call an empty one.
    """
    if isinstance(parameters, torch.Tensor):
        return (frozenset({id(parameters)}) if parameters.grad is not None else frozenset()), args, kwargs
    if not isinstance(parameters, Iterable):
        return frozenset(), args, kwargs
    parameters = list(parameters)
    if "parameters" in kwargs:
        kwargs = {**kwargs, "parameters": parameters}
    else:
        args = (parameters, *args[1:])
    ids = frozenset(id(p) for p in parameters if isinstance(p, torch.Tensor) and p.grad is not None)
    return ids, args, kwargs


def _bind_clip_grad_norm(parameters: Any, max_norm: float, norm_type: float = 2.0, *args: Any, **kwargs: Any
                         ) -> tuple[Any, float, float]:
    return parameters, float(max_norm), float(norm_type)


def _bind_with_norm(parameters: Any, max_norm: float, total_norm: torch.Tensor, *args: Any, **kwargs: Any
                    ) -> tuple[Any, float, torch.Tensor]:
    return parameters, float(max_norm), total_norm


def _bind_fsdp(module: Any, max_norm: float, norm_type: float = 2.0, *args: Any, **kwargs: Any
               ) -> tuple[float, float]:
    return float(max_norm), float(norm_type)


def _outermost(call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, bool]:
    outer = getattr(_inside, "clip", False)
    _inside.clip = True
    try:
        return call(*args, **kwargs), not outer
    finally:
        _inside.clip = outer


def _deliver(listeners: tuple[ClipListener, ...], clip: ClipCall) -> None:
    for listener in listeners:
        listener(clip)


def _around_clip_grad_norm(call: Callable[..., Any], listeners: tuple[ClipListener, ...], args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
    try:  # the parameters first: a generator is consumed by the call
        parameters, max_norm, norm_type = _bind_clip_grad_norm(*args, **kwargs)
    except TypeError:  # not a call shape we can read: not ours to judge
        return call(*args, **kwargs)
    ids, args, kwargs = _materialised(parameters, args, kwargs)
    result, outermost = _outermost(call, args, kwargs)
    if outermost and isinstance(result, torch.Tensor):
        _deliver(listeners, ClipCall(result, max_norm, norm_type, ids))
    return result


def _around_with_norm(call: Callable[..., Any], listeners: tuple[ClipListener, ...], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
    try:
        parameters, max_norm, total_norm = _bind_with_norm(*args, **kwargs)
    except TypeError:
        return call(*args, **kwargs)
    ids, args, kwargs = _materialised(parameters, args, kwargs)
    result, outermost = _outermost(call, args, kwargs)
    if outermost and isinstance(total_norm, torch.Tensor):
        _deliver(listeners, ClipCall(total_norm, max_norm, 2.0, ids))
    return result


def _around_fsdp(call: Callable[..., Any], listeners: tuple[ClipListener, ...], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    try:
        max_norm, norm_type = _bind_fsdp(*args, **kwargs)
    except TypeError:
        return call(*args, **kwargs)
    result, outermost = _outermost(call, args, kwargs)
    if outermost and isinstance(result, torch.Tensor):
        _deliver(listeners, ClipCall(result, max_norm, norm_type, frozenset()))
    return result


CLIP: Interception[ClipListener] = Interception("gradient clipping")
CLIP.patch(torch.nn.utils, "clip_grad_norm_", _around_clip_grad_norm)
CLIP.patch(torch.nn.utils, "clip_grad_norm", _around_clip_grad_norm)
CLIP.patch(torch.nn.utils, "clip_grads_with_norm_", _around_with_norm)
CLIP.patch("torch.distributed.fsdp:FullyShardedDataParallel", "clip_grad_norm_", _around_fsdp)
CLIP.patch("deepspeed.runtime.engine", "clip_grad_norm_", _around_clip_grad_norm)  # stage 0 fp32: same signature
