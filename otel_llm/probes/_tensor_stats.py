"""Statistics over lists of tensors with a number of kernels that does not grow with the list.

On accelerators every statistic is one multi-tensor (``torch._foreach_*``) kernel per
pass, and the per-tensor results are stacked once, so a 32-layer model launches as
many kernels as a 4-layer one. On CPU, where nothing is launched and every pass over
memory is what costs, the count of elements above a threshold runs tensor by tensor
in two passes instead of the four its multi-tensor form takes. That count is the only
statistic that needs a temporary the size of its input; it runs in waves of at most
``budget`` bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

__all__ = ["PER_TENSOR_DEVICES", "counts_above", "floor_in_dtype", "squared_norms"]


_LOW_PRECISION = (torch.float16, torch.bfloat16)

PER_TENSOR_DEVICES = frozenset({"cpu"})
"""Device types where a per-tensor loop beats a multi-tensor kernel: no launch to save, fewer passes to make."""


@functools.lru_cache(maxsize=64)
def floor_in_dtype(threshold: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value not above ``threshold`` (>= 0).

    ``abs(x) <= floor`` computed in ``dtype`` then agrees exactly with
    ``abs(x) <= threshold`` in float64, without a float32 copy of bf16 tensors.
    Found once per (threshold, dtype) with a host tensor, so no step pays the read-back.
    """
    value = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    if float(value) > threshold:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[value.element_size()]
        value = (value.view(bits) - 1).view(dtype)
    return float(value)


def _norms(tensors: Sequence[torch.Tensor], order: float, device: torch.device) -> torch.Tensor:
    """Per tensor, its ``order``-norm as a float64 vector on ``device``.

    Half-precision tensors are reduced into float32 (a count or a norm in bfloat16 keeps three
    digits); wider ones in their own dtype, which on CPU avoids a converted copy of every tensor.
    One kernel per dtype class present, whatever the number of tensors.
    """
    low = [index for index, tensor in enumerate(tensors) if tensor.dtype in _LOW_PRECISION]
    if not low or len(low) == len(tensors):
        dtype = torch.float32 if low else None
        return torch.stack(torch._foreach_norm(list(tensors), order, dtype=dtype)).to(device, torch.float64)
    low_set = set(low)
    wide = [index for index in range(len(tensors)) if index not in low_set]
    parts = [torch._foreach_norm([tensors[i] for i in low], order, dtype=torch.float32),
             torch._foreach_norm([tensors[i] for i in wide], order)]
    stacked = torch.cat([torch.stack(part).to(device, torch.float64) for part in parts])
    order_back = torch.tensor(low + wide, device=device).argsort()
    return stacked[order_back]


def squared_norms(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per tensor, the sum of squares, as a float64 vector on ``device``."""
    return _norms(tensors, 2, device).square()


def _pieces(tensors: Sequence[torch.Tensor], budget: int) -> tuple[list[list[torch.Tensor]], list[int]]:
    """``tensors`` grouped into waves of at most ``budget`` bytes (a larger tensor split into chunks),
    and for each piece, in wave order, the index of the tensor it came from."""
    waves: list[list[torch.Tensor]] = [[]]
    owners: list[int] = []
    filled = 0
    for index, tensor in enumerate(tensors):
        size = tensor.numel() * tensor.element_size()
        if size > budget and tensor.numel() > 1:
            chunk = max(1, budget // tensor.element_size())
            parts: Sequence[torch.Tensor] = tensor.reshape(-1).split(chunk)
        else:
            parts = (tensor,)
        for part in parts:
            part_size = part.numel() * part.element_size()
            if waves[-1] and filled + part_size > budget:
                waves.append([])
                filled = 0
            waves[-1].append(part)
            filled += part_size
            owners.append(index)
    return waves, owners


def counts_above(tensors: Sequence[torch.Tensor], threshold: float, device: torch.device, budget: int) -> torch.Tensor:
    """Per tensor, how many elements have abs > ``threshold`` (float64 vector on ``device``).

    Both paths compare with the threshold's floor in g's dtype (exact, see
    :func:`floor_in_dtype`). Multi-tensor: relu(|g| - floor) is zero exactly where
    |g| <= floor (IEEE subtraction of distinct values never gives zero), and its L0 norm
    counts the rest. Per tensor (CPU): |g| > floor, counted. The temporary holds at most
    ``budget`` bytes at a time.
    """
    per_tensor = bool(tensors) and tensors[0].device.type in PER_TENSOR_DEVICES
    # per tensor, |piece| and its mask (at most 1.5x the piece for 2-byte dtypes) live together
    waves, owners = _pieces(tensors, budget // 2 if per_tensor else budget)
    counts: list[torch.Tensor] = []
    floors = {dtype: floor_in_dtype(threshold, dtype) for dtype in {t.dtype for t in tensors}}
    for wave in waves:
        if per_tensor:
            wave_counts = [torch.count_nonzero(piece.abs() > floors[piece.dtype]) for piece in wave]
            counts.append(torch.stack(wave_counts).to(device, torch.float64))
            continue
        excess = torch._foreach_abs(wave)
        for dtype, floor in floors.items():  # in place, per dtype class: the order of ``excess`` is kept
            same = [piece for piece in excess if piece.dtype == dtype]
            if same:
                torch._foreach_sub_(same, floor)
                torch._foreach_clamp_min_(same, 0.0)
        counts.append(_norms(excess, 0, device))
        del excess
    stacked = torch.cat(counts)
    if len(owners) == len(tensors):
        return stacked
    index = torch.tensor(owners, device=device)
    return torch.zeros(len(tensors), dtype=torch.float64, device=device).index_add_(0, index, stacked)
