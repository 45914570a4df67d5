"""Gradient and update signals, taken at optimizer step boundaries.

At pre-step the gradients are final (after DDP all-reduce and AMP unscale), so
sparsity is read there, and so is the global norm unless the step clipped its
gradients: then the norm is the one the clip call computed before clipping
(:mod:`otel_llm.probes._clip_calls`), and whether the clip scaled the gradients
is counted on the device every step. Around a sampled step the probe
keeps a copy of the trainable parameters to measure the update. The norm is
also computed on the step before a sampled one, because the decay rate compares
consecutive optimizer steps, not consecutive samples.

Sharded parameters (FSDP2 DTensors) hold one shard per rank: the probe sums
per-rank partial statistics with one all-reduce so the exported values are the
global ones, not one shard's. The learning rates are read on the host after
the update.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any, cast

import torch

from otel_llm.catalog import (
    ATTR_PARAM_GROUP,
    GRAD_CLIPPED_STEPS,
    GRAD_NORM,
    GRAD_NORM_DECAY_RATE,
    GRAD_SPARSITY,
    PARAM_UPDATE_RATIO,
    PARAM_UPDATE_VARIANCE_RATIO,
    TRAIN_LEARNING_RATE,
)
from otel_llm.probes._clip_calls import CLIP, ClipCall
from otel_llm.probes._measuring import measuring
from otel_llm.probes._update_sample import CoordinateSample
from otel_llm.probes.base import Probe, StepPlan, StepValues
from otel_llm.probes.lora import lora_param_families
from otel_llm.runtime import fork

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["OptimizerProbe", "ShardReducer", "parameter_device", "trainable_params"]


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters that require grad, in param-group order (the same on every rank)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def parameter_device(optimizer: torch.optim.Optimizer | None) -> torch.device:
    """The device the optimizer's first trainable parameter lives on (CPU when it has none)."""
    params = trainable_params(optimizer) if optimizer is not None else []
    return params[0].device if params else torch.device("cpu")


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed support
        return None
    return DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds (a DTensor's local shard)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return cast(torch.Tensor, cast(Any, tensor).to_local())
    return tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (the norm clip_grad_norm_ returns under FSDP2) as a plain tensor."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return cast(torch.Tensor, cast(Any, tensor).full_tensor())
    return tensor


class ShardReducer:
    """Turns per-tensor partial sums into global sums for a fixed list of parameters.

    Sharded tensors contribute their local partial sums; replicated ones (plain
    tensors, present whole on every rank) contribute 1/world of theirs, so one
    SUM all-reduce over the shard group yields every global total exactly.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        dtensor = _dtensor_type()
        sharded = [dtensor is not None and isinstance(p, dtensor)
                   and any(pl.is_shard() for pl in cast(Any, p).placements) for p in params]
        self.group = None
        self.weights: list[float] = [1.0] * len(params)
        if any(sharded):
            first: Any = params[sharded.index(True)]
            self.group = first.device_mesh.get_group()
            import torch.distributed as dist

            world = dist.get_world_size(self.group)
            self.weights = [1.0 if s else 1.0 / world for s in sharded]
        self.sharded = sharded

    def sums(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """Global totals of a stack of per-tensor partials, shape (k, n_tensors) -> (k,)."""
        stacked = torch.stack(partials).double()
        weights = torch.tensor(self.weights, dtype=torch.float64, device=stacked.device)
        totals = (stacked * weights).sum(dim=1)
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(totals, group=self.group)
        return totals


def _squares(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.stack([n.to(device, torch.float64) for n in torch._foreach_norm(list(tensors))]).square()


def _above(tensors: list[torch.Tensor], threshold: float, device: torch.device) -> torch.Tensor:
    """Per tensor, how many elements have abs > threshold.

    relu(|g| - threshold) is zero exactly where |g| <= threshold (IEEE subtraction of
    distinct values never gives zero), and its L0 norm counts the rest.
    """
    excess = torch._foreach_abs(tensors)
    torch._foreach_sub_(excess, threshold)
    torch._foreach_clamp_min_(excess, 0.0)
    return torch.stack([n.to(device, torch.float64) for n in torch._foreach_norm(excess, 0)])


class OptimizerProbe(Probe):
    """Computes #1-#4, the pre-clip gradient norm, clipped steps and the learning rates for the followed optimizer.

    Always built: the sampler reads its gradient norm (a non-finite norm tightens sampling).
    """

    name = "optimizer"
    always = True
    every_step = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._threshold = config.grad_sparsity_threshold
        self._sample = CoordinateSample(config.update_sample_size, config.update_sample_seed)
        self._updates = self.enabled(PARAM_UPDATE_RATIO) or self.enabled(PARAM_UPDATE_VARIANCE_RATIO)
        self._prev_norm: tuple[int, torch.Tensor] | None = None
        self._reducer: tuple[tuple[int, ...], ShardReducer] | None = None
        self._families: dict[str, set[int]] = {}
        self._clips: list[ClipCall] = []
        self.reset()

    def start(self, model_known: bool) -> None:
        self.listen(CLIP, self._on_clip)

    def _on_clip(self, clip: ClipCall) -> None:
        """Keep the step's clip calls: one per disjoint parameter set (a new call over the same ones replaces)."""
        if fork.forked:
            return
        self._clips = [kept for kept in self._clips
                       if kept.parameters and clip.parameters and not kept.parameters & clip.parameters]
        self._clips.append(clip)

    def _pre_clip_norm(self) -> torch.Tensor | None:
        """The global L2 norm the step's clip calls computed, or None when there were none (or not L2)."""
        clips = self._clips
        if not clips or any(clip.norm_type != 2.0 for clip in clips):
            return None
        norms = [_full(clip.total_norm.detach()) for clip in clips]
        if len(norms) == 1:
            return norms[0]
        device = norms[0].device
        return torch.stack([n.to(device, torch.float32) for n in norms]).square().sum().sqrt()

    def tally(self) -> StepValues:
        """Whether the step's clip calls scaled the gradients, counted on the device."""
        values = StepValues()
        clips, self._clips = self._clips, []
        if clips and self.enabled(GRAD_CLIPPED_STEPS):
            device = clips[0].total_norm.device
            scaled = torch.stack([_full(clip.scaled).to(device) for clip in clips]).any()
            values.count(GRAD_CLIPPED_STEPS, scaled.to(torch.int64))
        return values

    def attach(self, model: torch.nn.Module) -> None:
        """Parameter subsets (LoRA factors) whose gradient sparsity is also reported, as groups."""
        self._families = {name: {id(p) for p in params} for name, params in lora_param_families(model).items()}

    def reset(self) -> None:
        """Forget the current step's partial results (after a failure)."""
        self._before: list[torch.Tensor] | None = None
        self._out = StepValues()

    def _reducer_for(self, params: list[torch.Tensor]) -> ShardReducer:
        key = tuple(id(p) for p in params)
        if self._reducer is None or self._reducer[0] != key:
            self._reducer = (key, ShardReducer(params))
        return self._reducer[1]

    @measuring()
    def before_update(self, optimizer: torch.optim.Optimizer, plan: StepPlan) -> None:
        step, sampled = plan.step, plan.sampled
        if not (sampled or plan.next_sampled):
            return
        pre_clip = self._pre_clip_norm()
        norm = pre_clip
        with_grad = [p for p in trainable_params(optimizer) if p.grad is not None and not p.grad.is_sparse]
        if with_grad and (sampled or pre_clip is None):
            norm = self._gradient_statistics(with_grad, step, sampled, pre_clip)
        if sampled and self._updates:
            params = [_local(p.detach()) for p in trainable_params(optimizer)]
            self._before = list(torch._foreach_mul(params, 1.0)) if params else None
        self._prev_norm = (step, norm) if norm is not None else None

    def _gradient_statistics(self, with_grad: list[torch.Tensor], step: int, sampled: bool,
                             pre_clip: torch.Tensor | None) -> torch.Tensor:
        """The global norm (the clip's, when it computed one) and, on sampled steps, #1 and #2 into the output."""
        reducer = self._reducer_for(with_grad)
        grads = [_local(cast(torch.Tensor, p.grad).detach()) for p in with_grad]
        device = grads[0].device
        partials = [_squares(grads, device)]
        groups: list[str] = []
        if sampled:
            above = _above(grads, self._threshold, device)
            sizes = torch.tensor([float(g.numel()) for g in grads], dtype=torch.float64, device=device)
            partials += [above, sizes]
            for name, members in self._families.items():
                chosen = [id(p) in members for p in with_grad]
                if any(chosen):
                    mask = torch.tensor(chosen, dtype=torch.float64, device=device)
                    partials += [above * mask, sizes * mask]
                    groups.append(name)
        totals = reducer.sums(partials)
        norm = totals[0].sqrt().float() if pre_clip is None else pre_clip.to(device)
        if sampled:
            self._out = StepValues()
            self._out.gauge(GRAD_NORM, norm)
            if self._prev_norm is not None and self._prev_norm[0] == step - 1:
                previous = self._prev_norm[1].to(norm.device)
                self._out.gauge(GRAD_NORM_DECAY_RATE, (previous - norm) / (previous + 1e-8))
            self._out.gauge(GRAD_SPARSITY, (totals[2] - totals[1]) / totals[2], {ATTR_PARAM_GROUP: "all"})
            for offset, name in enumerate(groups):
                above_total, size_total = totals[3 + 2 * offset], totals[4 + 2 * offset]
                self._out.gauge(GRAD_SPARSITY, (size_total - above_total) / size_total, {ATTR_PARAM_GROUP: name})
        return norm

    @measuring()
    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        """The sampled step's signals; the gradient ones exist after a sampled :meth:`before_update`."""
        out, self._out = self._out, StepValues()
        for index, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, (Real, torch.Tensor)):  # Adafactor(relative_step=True) keeps lr=None
                out.gauge(TRAIN_LEARNING_RATE, float(lr), {ATTR_PARAM_GROUP: str(index)})
        before, self._before = self._before, None
        if before is None:
            return out
        params = trainable_params(optimizer)
        if len(params) != len(before):  # param groups changed during the step: no honest update ratio
            return out
        reducer = self._reducer_for(params)
        delta = torch._foreach_sub([_local(p.detach()) for p in params], before)
        device = before[0].device
        totals = reducer.sums([_squares(delta, device), _squares(before, device)])
        out.gauge(PARAM_UPDATE_RATIO, (totals[0] / totals[1]).sqrt())
        replicated = [d for d, sharded in zip(delta, reducer.sharded) if not sharded]
        if replicated:
            out.gauge(PARAM_UPDATE_VARIANCE_RATIO, self._sample.variance_ratio(replicated))
        else:  # every coordinate lives on exactly one rank: ranks cannot disagree about it
            out.gauge(PARAM_UPDATE_VARIANCE_RATIO, torch.zeros((), dtype=torch.float64, device=device))
        return out
