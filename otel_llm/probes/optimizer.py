"""Gradient and update signals, taken at optimizer step boundaries.

At pre-step the gradients are final (after DDP all-reduce and AMP unscale), so
the global norm and sparsity are read there. Around a sampled step the probe
keeps a copy of the trainable parameters to measure the update. The norm is
also computed on the step before a sampled one, because the decay rate compares
consecutive optimizer steps, not consecutive samples.
"""

from __future__ import annotations

import torch

from otel_llm.catalog import (
    ATTR_PARAM_GROUP,
    GRAD_NORM,
    GRAD_NORM_DECAY_RATE,
    GRAD_SPARSITY,
    PARAM_UPDATE_RATIO,
    PARAM_UPDATE_VARIANCE_RATIO,
)
from otel_llm.probes.base import StepValues
from otel_llm.probes.update_sample import CoordinateSample

__all__ = ["OptimizerProbe", "global_norm", "trainable_params"]


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters that require grad, in param-group order (the same on every rank)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all elements of ``tensors`` as a 0-d float32 tensor on the first tensor's device."""
    device = tensors[0].device
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]))


def _fraction_at_most(tensors: list[torch.Tensor], threshold: float, device: torch.device) -> torch.Tensor:
    """Fraction of elements with abs <= threshold, with a handful of multi-tensor kernels.

    relu(|g| - threshold) is zero exactly where |g| <= threshold (IEEE subtraction of
    distinct values never gives zero), and its L0 norm counts the rest.
    """
    excess = torch._foreach_abs(tensors)
    torch._foreach_sub_(excess, threshold)
    torch._foreach_clamp_min_(excess, 0.0)
    above = torch.stack([n.to(device, torch.float64) for n in torch._foreach_norm(excess, 0)]).sum()
    total = sum(t.numel() for t in tensors)
    return (total - above) / total


class OptimizerProbe:
    """Computes #1-#4 and the gradient norm for one optimizer."""

    def __init__(self, sparsity_threshold: float, sample: CoordinateSample, *, updates: bool = True) -> None:
        self._threshold = sparsity_threshold
        self._sample = sample
        self._updates = updates
        self._prev_norm: tuple[int, torch.Tensor] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the current step's partial results (after a failure)."""
        self._before: list[torch.Tensor] | None = None
        self._out = StepValues()

    @torch.no_grad()
    def pre_step(self, optimizer: torch.optim.Optimizer, step: int, sampled: bool, next_sampled: bool) -> None:
        if not (sampled or next_sampled):
            return
        params = trainable_params(optimizer)
        grads = [p.grad.detach() for p in params if p.grad is not None and not p.grad.is_sparse]
        norm = global_norm(grads) if grads else None
        if sampled:
            self._out = StepValues()
            if norm is not None:
                self._out.gauge(GRAD_NORM, norm)
                if self._prev_norm is not None and self._prev_norm[0] == step - 1:
                    previous = self._prev_norm[1].to(norm.device)
                    self._out.gauge(GRAD_NORM_DECAY_RATE, (previous - norm) / (previous + 1e-8))
                self._out.gauge(GRAD_SPARSITY, _fraction_at_most(grads, self._threshold, norm.device),
                                {ATTR_PARAM_GROUP: "all"})
            if self._updates and params:
                self._before = torch._foreach_mul([p.detach() for p in params], 1.0)
        self._prev_norm = (step, norm) if norm is not None else None

    @torch.no_grad()
    def post_step(self, optimizer: torch.optim.Optimizer) -> StepValues:
        """The sampled step's signals; call only after a sampled ``pre_step``."""
        out, self._out = self._out, StepValues()
        before, self._before = self._before, None
        if before is None:
            return out
        after = [p.detach() for p in trainable_params(optimizer)]
        if len(after) != len(before):  # param groups changed during the step: no honest update ratio
            return out
        delta = torch._foreach_sub(after, before)
        out.gauge(PARAM_UPDATE_RATIO, global_norm(delta) / global_norm(before))
        out.gauge(PARAM_UPDATE_VARIANCE_RATIO, self._sample.variance_ratio(delta))
        return out
