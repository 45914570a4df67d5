"""A model whose gradient norm each step is chosen by the test, so the decay rate is scripted exactly.

``loss(norm)`` is ``(w * d * norm).sum()`` with ``d`` a unit vector: the gradient is
``d * norm`` whatever ``w`` is, so its L2 norm is ``norm`` and a step's decay rate is
``(norm_{t-1} - norm_t) / norm_{t-1}``.
"""

from __future__ import annotations

import torch

__all__ = ["Scripted", "norms_for"]


class Scripted(torch.nn.Module):
    def __init__(self, size: int = 4) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(size))
        self.register_buffer("direction", torch.full((size,), size ** -0.5))

    def loss(self, norm: float) -> torch.Tensor:
        return (self.w * self.direction * norm).sum()


def norms_for(decays: dict[int, float], steps: int) -> list[float]:
    """Norm 1 on every step but those in ``decays``, whose norm gives that decay rate from the step before (norm 1)."""
    assert all(step - 1 not in decays for step in decays), "a scripted step must follow one of norm 1"
    return [1.0 - decays[step] if step in decays else 1.0 for step in range(steps)]
