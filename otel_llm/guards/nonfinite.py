"""Whether an update's gradients hold NaN/Inf, and how an update is withheld from the optimizer.

The check reduces on the device to one flag per (device, dtype) group: the
per-tensor max-abs norm is NaN or Inf exactly when the tensor holds one, and
never overflows as a sum of squares would. Reading the flag is the one small
device-to-host read per step that skip_nonfinite costs. Sharded gradients
(DTensor shards) are checked locally and the flag is all-reduced (MAX), so
every rank skips together.

Skipping works as ``torch.amp.GradScaler``'s does, without a wrapper: torch
optimizers leave every parameter whose ``grad`` is None untouched (its value and
its state), so the gradients are set aside before the step and put back after.
"""

from __future__ import annotations

from typing import Any, cast

import torch

__all__ = ["Withheld", "has_nonfinite"]


def _local(grad: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A DTensor's local shard (and True), else the tensor itself."""
    to_local = getattr(grad, "to_local", None)
    if callable(to_local) and hasattr(grad, "placements"):
        return cast(torch.Tensor, to_local()), True
    return grad, False


def has_nonfinite(grads: list[torch.Tensor]) -> bool:
    """Whether any gradient holds NaN or Inf (one device-to-host read; an all-reduce when sharded)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    sharded = False
    for grad in grads:
        local, is_shard = _local(grad.detach())
        sharded = sharded or is_shard
        if local.numel():
            groups.setdefault((local.device, local.dtype), []).append(local)
    if not groups and not sharded:
        return False
    device = grads[0].device if not groups else next(iter(groups))[0]
    flags = [torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all().logical_not().to(device)
             for tensors in groups.values()]
    flag = torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=device)
    if sharded:
        import torch.distributed as dist

        total = flag.to(torch.float32)
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        flag = total > 0
    return bool(flag.item())


class Withheld:
    """Gradients set aside so the optimizer step leaves their parameters and state unchanged."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self._grads: list[tuple[torch.Tensor, Any]] = [(p, p.grad) for p in params if p.grad is not None]
        for param, _ in self._grads:
            param.grad = None

    def restore(self) -> None:
        """Put the gradients back (the loop still sees them, as GradScaler leaves them)."""
        for param, grad in self._grads:
            param.grad = grad
        self._grads.clear()
