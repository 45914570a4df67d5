"""DeepSpeed: where one optimizer update begins and ends, and what its inner torch optimizer holds.

DeepSpeed's optimizer wrappers (ZeRO 1-2, ZeRO-3, the fp16/bf16 optimizers of
stage 0) are not torch optimizers; they own one and drive it:

* one update calls the torch ``step()`` once per param group (ZeRO 1-2) or per
  sub-group (ZeRO-3), each time with only that group's flat fp32 partition;
* the gradients it sees are already unscaled and clipped, and the pre-clip
  global norm is the one the wrapper stashes in ``_global_grad_norm``;
* an update skipped for an fp16 overflow never reaches the torch ``step()``;
* the stage-0 fp16/bf16 optimizers step once with zero gradients while
  ``deepspeed.initialize`` builds them.

So the wrapper's ``step()`` is the update boundary (:data:`UPDATE`), steps
inside ``deepspeed.initialize`` are not training (:func:`initializing`), and a
partitioned wrapper's flat partitions, the segments of them that hold
parameters and the data-parallel group are read here (:func:`partitions`).
Nothing imports deepspeed: the slots are patched when its modules are imported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from otel_llm.probes.interception import Interception

__all__ = ["UPDATE", "Partitions", "Segments", "UpdateListener", "clip_bound", "initializing", "partitions",
           "pre_clip_norm"]

UpdateListener = Callable[[Any, bool], None]
"""``listener(wrapper, begins)``: a DeepSpeed wrapper's ``step()`` begins (True) or has returned (False)."""

_WRAPPERS = (
    "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer",
    "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3",
    "deepspeed.runtime.bf16_optimizer:BF16_Optimizer",
    "deepspeed.runtime.fp16.fused_optimizer:FP16_Optimizer",
    "deepspeed.runtime.fp16.unfused_optimizer:FP16_UnfusedOptimizer",
)

_state = threading.local()


def _around_step(call: Callable[..., Any], listeners: tuple[UpdateListener, ...], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    wrapper = args[0] if args else None
    for listener in listeners:
        listener(wrapper, True)
    try:
        return call(*args, **kwargs)
    finally:
        for listener in listeners:
            listener(wrapper, False)


def _around_initialize(call: Callable[..., Any], listeners: tuple[UpdateListener, ...], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
    depth = getattr(_state, "initializing", 0)
    _state.initializing = depth + 1
    try:
        return call(*args, **kwargs)
    finally:
        _state.initializing = depth


UPDATE: Interception[UpdateListener] = Interception("DeepSpeed optimizer step")
for _owner in _WRAPPERS:
    UPDATE.patch(_owner, "step", _around_step)
UPDATE.patch("deepspeed", "initialize", _around_initialize)


def initializing() -> bool:
    """Whether this thread is inside ``deepspeed.initialize`` (its optimizer steps are set-up, not training)."""
    return getattr(_state, "initializing", 0) > 0


def _is_deepspeed(obj: object) -> bool:
    return type(obj).__module__.startswith("deepspeed.")


Segments = tuple[tuple[int, int], ...]
"""(offset, length) of the elements of a flat partition that hold parameters, in order."""


@dataclass(frozen=True)
class Partitions:
    """A partitioned wrapper's flat fp32 partitions: one per (sub-)group, disjoint across the group's ranks.

    The last rank's partitions are padded: at their end (ZeRO 1-2, BF16_Optimizer) or
    after each parameter's piece (ZeRO-3), and ZeRO-3's padding is never initialised,
    so statistics read only the segments that hold parameters.
    """

    segments: dict[int, Segments]
    """id of each flat partition tensor -> its parameter-holding segments on this rank."""
    group: Any
    """The data-parallel process group the partitions split."""


def _trailing(flat: torch.Tensor, padding: Any) -> Segments:
    return ((0, flat.numel() - int(padding or 0)),)


def _per_parameter(params: list[Any], paddings: list[int]) -> Segments:
    segments, offset = [], 0
    for param, padding in zip(params, paddings):
        size = int(param.ds_tensor.ds_numel)
        segments.append((offset, size - int(padding)))
        offset += size
    return tuple(segments)


def partitions(wrapper: object) -> Partitions | None:
    """The flat partitions of ZeRO 1-3 and BF16_Optimizer, or None for a wrapper whose tensors are replicated."""
    if not _is_deepspeed(wrapper):
        return None
    segments: dict[int, Segments] = {}
    zero3 = getattr(wrapper, "fp32_partitioned_groups_flat", None)
    if zero3:
        paddings, groups = getattr(wrapper, "groups_padding", []), getattr(wrapper, "fp16_groups", [])
        for index, flat in enumerate(zero3):
            segments[id(flat)] = _per_parameter(groups[index], paddings[index])
    else:
        flats = (getattr(wrapper, "single_partition_of_fp32_groups", None)  # ZeRO 1-2
                 or getattr(wrapper, "fp32_groups_flat_partition", None) or [])  # BF16_Optimizer
        paddings = getattr(wrapper, "groups_padding", None) or getattr(wrapper, "group_paddings", None) or []
        for index, flat in enumerate(flats):
            segments[id(flat)] = _trailing(flat, paddings[index] if index < len(paddings) else 0)
    return Partitions(segments, getattr(wrapper, "dp_process_group", None)) if segments else None


def pre_clip_norm(wrapper: object) -> torch.Tensor | float | None:
    """The unscaled global gradient norm the wrapper computed before clipping this update, if it did."""
    norm = getattr(wrapper, "_global_grad_norm", None)
    return norm if isinstance(norm, (torch.Tensor, float, int)) and not isinstance(norm, bool) else None


def clip_bound(wrapper: object) -> float:
    """The wrapper's gradient clipping bound (0: no clipping)."""
    bound = getattr(wrapper, "clip_grad", 0.0)
    return float(bound) if isinstance(bound, (int, float)) else 0.0
