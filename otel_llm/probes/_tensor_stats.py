"""Statistics over lists of tensors with a number of kernels that does not grow with the list.

Every statistic is one multi-tensor (``torch._foreach_*``) kernel per pass, and the
per-tensor results are stacked once, so a 32-layer model launches as many kernels as
a 4-layer one. The only statistic that needs a temporary the size of its input (the
count of elements above a threshold) runs in waves of at most ``budget`` bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["counts_above", "squared_norms"]


_LOW_PRECISION = (torch.float16, torch.bfloat16)


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

    relu(|g| - threshold) is zero exactly where |g| <= threshold (IEEE subtraction of
    distinct values never gives zero), and its L0 norm counts the rest. The temporary
    holds at most ``budget`` bytes at a time.
    """
    waves, owners = _pieces(tensors, budget)
    counts: list[torch.Tensor] = []
    for wave in waves:
        excess = torch._foreach_abs(wave)
        torch._foreach_sub_(excess, threshold)
        torch._foreach_clamp_min_(excess, 0.0)
        counts.append(_norms(excess, 0, device))
        del excess
    stacked = torch.cat(counts)
    if len(owners) == len(tensors):
        return stacked
    index = torch.tensor(owners, device=device)
    return torch.zeros(len(tensors), dtype=torch.float64, device=device).index_add_(0, index, stacked)
