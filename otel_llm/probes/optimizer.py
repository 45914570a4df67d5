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
from dataclasses import dataclass, field
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
from otel_llm.probes._deepspeed import Partitions, Segments, clip_bound, partitions, pre_clip_norm
from otel_llm.probes._measuring import measuring
from otel_llm.probes._tensor_stats import counts_above, squared_norms
from otel_llm.probes._update_sample import CoordinateSample
from otel_llm.probes._update_snapshot import Snapshot, SnapshotPlan, budget_bytes
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

    Sharded tensors (FSDP2 DTensor shards, DeepSpeed's flat partitions) contribute
    their local partial sums; replicated ones (plain tensors, present whole on every
    rank) contribute 1/world of theirs, so one SUM all-reduce over the shard group
    yields every global total exactly. Statistics are taken over :meth:`views`: a
    partition's parameter-holding segments (never its padding), else the tensor itself.
    """

    def __init__(self, params: list[torch.Tensor], partitions: Partitions | None = None) -> None:
        self.group: Any = None
        self.snapshot_plan: SnapshotPlan | None = None
        """What a sampled step copies of these parameters (made once, see :class:`SnapshotPlan`)."""
        self._constants: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._segments: list[Segments | None] = [None] * len(params)
        if partitions is not None and all(id(p) in partitions.segments for p in params):
            self._segments = [partitions.segments[id(p)] for p in params]
            self.owner = [index for index, segments in enumerate(self._segments) for _ in cast(Segments, segments)]
            self.weights = [1.0] * len(self.owner)
            self.sharded = [True] * len(self.owner)
            if _distributed():
                import torch.distributed as dist

                self.group = partitions.group if partitions.group is not None else dist.group.WORLD
            return
        self.owner = list(range(len(params)))
        self.weights = [1.0] * len(params)
        dtensor = _dtensor_type()
        self.sharded = [dtensor is not None and isinstance(p, dtensor)
                        and any(pl.is_shard() for pl in cast(Any, p).placements) for p in params]
        if any(self.sharded):
            first: Any = params[self.sharded.index(True)]
            self.group = first.device_mesh.get_group()
            import torch.distributed as dist

            world = dist.get_world_size(self.group)
            self.weights = [1.0 if s else 1.0 / world for s in self.sharded]

    def views(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The parts of ``tensors`` (the parameters, their gradients or values) that statistics read."""
        out: list[torch.Tensor] = []
        for tensor, segments in zip(tensors, self._segments):
            local = _local(tensor)
            if segments is None:
                out.append(local)
            else:
                flat = local.reshape(-1)
                out.extend(flat.narrow(0, offset, length) for offset, length in segments)
        return out

    def local(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """This rank's weighted totals of a stack of per-tensor partials, shape (k, n_tensors) -> (k,)."""
        stacked = torch.stack(partials).double()
        return (stacked * self.constant("weights", self.weights, stacked.device)).sum(dim=1)

    def constant(self, name: str, values: Sequence[float], device: torch.device) -> torch.Tensor:
        """A float64 vector over the views that never changes for this parameter list, made once per device."""
        key = (name, device)
        tensor = self._constants.get(key)
        if tensor is None:
            tensor = self._constants[key] = torch.tensor(values, dtype=torch.float64, device=device)
        return tensor

    def sums(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """Global totals of a stack of per-tensor partials (one all-reduce when sharded)."""
        return _all_reduce(self.local(partials), self.group)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _all_reduce(totals: torch.Tensor, group: Any) -> torch.Tensor:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(totals, group=group)
    return totals


@dataclass
class _Update:
    """One optimizer update's local partial sums, over however many inner torch steps it took.

    A plain loop steps once per update; DeepSpeed steps its torch optimizer once per
    param group or sub-group, each time over another flat partition.
    """

    step: int
    sampled: bool
    grads: torch.Tensor | None = None
    """This rank's totals: sum g^2, then (sampled, sparsity exported) count |g| > threshold, size, and both
    per family."""
    group: Any = None
    seen: set[tuple[int, ...]] = field(default_factory=set)
    """The parameter lists of the inner steps so far (DeepSpeed: one flat partition each)."""
    families: set[str] = field(default_factory=set)
    """Families with a member among the update's gradients."""
    before: list[tuple[Snapshot, ShardReducer]] = field(default_factory=list)
    """Per inner step: its parameters before the step, and how to sum over them."""

    def add_grads(self, totals: torch.Tensor, group: Any) -> None:
        self.grads = totals if self.grads is None else self.grads + totals.to(self.grads.device)
        if group is not None:
            self.group = group


class OptimizerProbe(Probe):
    """Computes #1-#4, the pre-clip gradient norm, clipped steps and the learning rates for the followed optimizer.

    Always built: the sampler reads its gradient norm (a non-finite norm tightens sampling).
    Partial sums of every inner step of an update are summed over ranks with one
    all-reduce when the update ends.
    """

    name = "optimizer"
    always = True
    every_step = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._threshold = config.grad_sparsity_threshold
        self._sample = CoordinateSample(config.update_sample_size, config.update_sample_seed)
        self._updates = self.enabled(PARAM_UPDATE_RATIO) or self.enabled(PARAM_UPDATE_VARIANCE_RATIO)
        self._sparsity = self.enabled(GRAD_SPARSITY)
        self._prev_norm: tuple[int, torch.Tensor] | None = None
        self._reducers: dict[tuple[int, ...], ShardReducer] = {}
        self._partitions: tuple[int, Partitions | None] | None = None
        self._wrapper_norm: tuple[torch.Tensor | float, float] | None = None
        self._families: dict[str, set[int]] = {}
        self._clips: list[ClipCall] = []
        self._counts = StepValues()
        self._device = torch.device("cpu")
        """Where the followed parameters live: the norm of a step with nothing else to sum goes there."""
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

    def begin_update(self, wrapper: object) -> None:
        """A DeepSpeed wrapper's update begins: its partitions say how to sum the inner steps' tensors."""
        if self._partitions is None or self._partitions[0] != id(wrapper):
            self._partitions = (id(wrapper), partitions(wrapper))
            self._reducers.clear()
        self._wrapper_norm = None

    def end_update(self, wrapper: object) -> None:
        """The update ended: keep the pre-clip norm and the clip bound the wrapper used."""
        norm = pre_clip_norm(wrapper)
        self._wrapper_norm = (norm, clip_bound(wrapper)) if norm is not None else None

    def _clipped_l2(self) -> bool:
        """Whether the step's clip calls computed the L2 norm (then an unsampled step need not)."""
        return bool(self._clips) and all(clip.norm_type == 2.0 for clip in self._clips)

    def _pre_clip_norm(self, device: torch.device) -> torch.Tensor | None:
        """The global L2 norm computed before clipping (DeepSpeed's, else the step's clip calls'), or None."""
        if self._wrapper_norm is not None:
            norm = self._wrapper_norm[0]
            if isinstance(norm, torch.Tensor):
                return norm.detach().to(device, torch.float32).reshape(())
            return torch.tensor(float(norm), dtype=torch.float32, device=device)
        if not self._clipped_l2():
            return None
        norms = [_full(clip.total_norm.detach()) for clip in self._clips]
        if len(norms) == 1:
            return norms[0].to(device)
        return torch.stack([n.to(device, torch.float32) for n in norms]).square().sum().sqrt()

    def begin_step(self, sampled: bool) -> None:
        """The previous step has ended: its norm (for the next decay rate) and whether it clipped are settled.

        Settled here, not in :meth:`tally`, which a flush from another thread may call mid-step.
        """
        super().begin_step(sampled)
        self._conclude()
        clips, self._clips = self._clips, []
        wrapper_norm, self._wrapper_norm = self._wrapper_norm, None
        if not self.enabled(GRAD_CLIPPED_STEPS):
            return
        if wrapper_norm is not None:
            norm, bound = wrapper_norm
            if bound > 0:
                scaled = norm + 1e-6 > bound  # DeepSpeed's rule, as torch's
                self._counts.count(GRAD_CLIPPED_STEPS, scaled.to(torch.int64) if isinstance(scaled, torch.Tensor)
                                   else int(scaled))
        elif clips:
            device = clips[0].total_norm.device
            scaled = torch.stack([_full(clip.scaled).to(device) for clip in clips]).any()
            self._counts.count(GRAD_CLIPPED_STEPS, scaled.to(torch.int64))

    def tally(self) -> StepValues:
        """Whether the ended steps' clip calls (or DeepSpeed's clipping) scaled the gradients, counted on the device."""
        counts, self._counts = self._counts, StepValues()
        return counts

    def attach(self, model: torch.nn.Module) -> None:
        """Parameter subsets (LoRA factors) whose gradient sparsity is also reported, as groups."""
        self._families = {name: {id(p) for p in params} for name, params in lora_param_families(model).items()}

    def reset(self) -> None:
        """Forget the current update's partial results (after a failure)."""
        self._update: _Update | None = None
        self._out = StepValues()

    def _reducer_for(self, params: list[torch.Tensor]) -> ShardReducer:
        key = tuple(id(p) for p in params)
        reducer = self._reducers.get(key)
        if reducer is None:
            if len(self._reducers) >= 64:  # parameter lists that changed: keep only recent ones
                self._reducers.clear()
            reducer = self._reducers[key] = ShardReducer(
                params, self._partitions[1] if self._partitions is not None else None)
        return reducer

    @measuring()
    def before_update(self, optimizer: torch.optim.Optimizer, plan: StepPlan) -> None:
        """One inner step's gradients (and, sampled, parameters before the step) into the update's partial sums."""
        step, sampled = plan.step, plan.sampled
        if not (sampled or plan.next_sampled):
            return
        params = trainable_params(optimizer)
        with_grad = [p for p in params if p.grad is not None and not p.grad.is_sparse]
        key = tuple(id(p) for p in params)
        if params:
            self._device = params[0].device
        update = self._update
        if update is None or update.step != step or key in update.seen:  # the same tensors again: read anew
            update = self._update = _Update(step, sampled)
        update.seen.add(key)
        with torch.no_grad():
            if with_grad and (sampled or not self._clipped_l2()):
                reducer = self._reducer_for(with_grad)
                update.add_grads(reducer.local(self._gradient_partials(with_grad, reducer, sampled, update)),
                                 reducer.group)
            if sampled and self._updates and params:
                reducer = self._reducer_for(params)
                views = reducer.views(params)
                snapshot_plan = reducer.snapshot_plan
                if snapshot_plan is None or not snapshot_plan.current(views):
                    snapshot_plan = reducer.snapshot_plan = SnapshotPlan.make(
                        views, self._budget(views), self.config.update_sample_seed)
                update.before.append((Snapshot(views, snapshot_plan, views[0].device), reducer))

    def _budget(self, tensors: list[torch.Tensor]) -> int:
        return budget_bytes(tensors, self.config.step_memory_fraction, self.config.step_memory_floor_mib)

    def _gradient_partials(self, with_grad: list[torch.Tensor], reducer: ShardReducer, sampled: bool,
                           update: _Update) -> list[torch.Tensor]:
        """Per view: squared norm; sampled (sparsity exported), also elements above the threshold and size."""
        grads = reducer.views([cast(torch.Tensor, p.grad) for p in with_grad])
        device = grads[0].device
        partials = [squared_norms(grads, device)]
        if sampled and self._sparsity:
            above = counts_above(grads, self._threshold, device, self._budget(grads))
            sizes = reducer.constant("sizes", [float(g.numel()) for g in grads], device)
            partials += [above, sizes]
            for name, members in self._families.items():
                chosen = [id(with_grad[owner]) in members for owner in reducer.owner]
                if any(chosen):
                    update.families.add(name)
                mask = reducer.constant(f"family {name}", [float(c) for c in chosen], device)
                partials += [above * mask, sizes * mask]
        return partials

    def _conclude(self) -> None:
        """Sum the update's partials over ranks (one all-reduce) into the norm and, sampled, #1-#4."""
        update, self._update = self._update, None
        if update is None:
            return
        local: list[torch.Tensor] = [] if update.grads is None else [update.grads]
        group = update.group
        deltas: list[tuple[list[torch.Tensor], ShardReducer]] = []
        with torch.no_grad():
            for snapshot, reducer in update.before:
                delta, delta_squares = snapshot.deltas()
                local.append(reducer.local([delta_squares, snapshot.before_squares]))
                deltas.append((delta, reducer))
                group = reducer.group if reducer.group is not None else group
        device = local[0].device if local else self._device
        # an unsampled step before a sampled one, with the clip's norm, has no partials to sum
        totals = _all_reduce(torch.cat([t.to(device) for t in local]), group) if local else None
        grad_count = 0 if update.grads is None else update.grads.numel()
        norm = self._pre_clip_norm(device)
        if norm is None and grad_count and totals is not None:
            norm = totals[0].sqrt().float()
        previous = self._prev_norm
        if norm is not None:
            self._prev_norm = (update.step, norm)
        if not update.sampled or totals is None:
            return
        out = self._out
        if norm is not None:
            out.gauge(GRAD_NORM, norm)
            if previous is not None and previous[0] == update.step - 1:
                before_norm = previous[1].to(norm.device)
                out.gauge(GRAD_NORM_DECAY_RATE, (before_norm - norm) / (before_norm + 1e-8))
        if grad_count and self._sparsity:
            out.gauge(GRAD_SPARSITY, (totals[2] - totals[1]) / totals[2], {ATTR_PARAM_GROUP: "all"})
            for offset, name in enumerate(self._families):
                if name in update.families:
                    above_total, size_total = totals[3 + 2 * offset], totals[4 + 2 * offset]
                    out.gauge(GRAD_SPARSITY, (size_total - above_total) / size_total, {ATTR_PARAM_GROUP: name})
        if deltas:
            update_totals = totals[grad_count:].reshape(-1, 2).sum(dim=0)
            out.gauge(PARAM_UPDATE_RATIO, (update_totals[0] / update_totals[1]).sqrt())
            replicated = [d for delta, reducer in deltas for d, sharded in zip(delta, reducer.sharded) if not sharded]
            if replicated:
                out.gauge(PARAM_UPDATE_VARIANCE_RATIO, self._sample.variance_ratio(replicated))
            else:  # every coordinate lives on exactly one rank: ranks cannot disagree about it
                out.gauge(PARAM_UPDATE_VARIANCE_RATIO, torch.zeros((), dtype=torch.float64, device=device))

    @measuring()
    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        """The sampled step's signals; the gradient ones exist after a sampled :meth:`before_update`."""
        self._conclude()
        out, self._out = self._out, StepValues()
        for index, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, (Real, torch.Tensor)):  # Adafactor(relative_step=True) keeps lr=None
                out.gauge(TRAIN_LEARNING_RATE, float(lr), {ATTR_PARAM_GROUP: str(index)})
        return out
