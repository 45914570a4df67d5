"""The fixed, seeded coordinate sample behind ``llm.param.update_variance_ratio``.

Every rank draws the same coordinates (same seed, same parameter order), so one
all-reduce of (delta, delta^2) at those coordinates gives the cross-rank
variance of the update without moving whole models. When the model has no
more coordinates than the sample size, every coordinate is used (exact).
"""

from __future__ import annotations

import torch

from otel_llm.runtime.rank import data_parallel_world

__all__ = ["CoordinateSample", "variance_ratio_from_sums"]


def variance_ratio_from_sums(sum_delta: torch.Tensor, sum_sq: torch.Tensor, world_size: int) -> torch.Tensor:
    """r = sum_j Var_i(d_ij) / mean_i |d_i|^2 from per-coordinate sums over ranks i (population variance)."""
    mean = sum_delta / world_size
    variance = (sum_sq / world_size - mean.square()).clamp_min(0.0)
    denominator = sum_sq.sum() / world_size
    return torch.where(denominator > 0, variance.sum() / denominator.clamp_min(1e-300), denominator * 0.0)


class CoordinateSample:
    """Per-parameter flat indices of the shared sample, drawn lazily on first use."""

    def __init__(self, size: int, seed: int) -> None:
        self._size = size
        self._seed = seed
        self._indices: list[torch.Tensor | None] | None = None
        self._shapes: list[int] = []

    def _draw(self, numels: list[int], devices: list[torch.device]) -> list[torch.Tensor | None]:
        total = sum(numels)
        if total <= self._size:
            return [None] * len(numels)
        generator = torch.Generator().manual_seed(self._seed)
        flat = torch.unique(torch.randint(total, (self._size,), generator=generator))
        indices: list[torch.Tensor | None] = []
        offset = 0
        for numel, device in zip(numels, devices):
            local = flat[(flat >= offset) & (flat < offset + numel)] - offset
            indices.append(local.to(device))
            offset += numel
        return indices

    def gather(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """The update at the sampled coordinates, as one float64 vector."""
        numels = [d.numel() for d in deltas]
        if self._indices is None or numels != self._shapes:
            self._indices = self._draw(numels, [d.device for d in deltas])
            self._shapes = numels
        device = deltas[0].device
        parts = [d.reshape(-1) if idx is None else d.reshape(-1)[idx] for d, idx in zip(deltas, self._indices)]
        return torch.cat([p.to(device, torch.float64) for p in parts])

    def variance_ratio(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """#4 for this step: 0 with one rank, else one all-reduce of (delta, delta^2) on the default group."""
        world = data_parallel_world()
        if world <= 1:
            return torch.zeros((), dtype=torch.float64, device=deltas[0].device)
        import torch.distributed as dist

        sampled = self.gather(deltas)
        sums = torch.cat([sampled, sampled.square()])
        dist.all_reduce(sums)
        half = sampled.numel()
        return variance_ratio_from_sums(sums[:half], sums[half:], world)
