"""A tiny GPT, its optimizer and a few training steps, for tests that need a real loop and nothing more."""

from __future__ import annotations

import torch

from tests.models import GPT

__all__ = ["VOCAB", "tiny", "train"]

VOCAB = 64


def tiny(seed: int = 0) -> tuple[GPT, torch.optim.Optimizer]:
    """A seeded tiny GPT and its SGD optimizer."""
    torch.manual_seed(seed)
    model = GPT(vocab=VOCAB)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def train(model: GPT, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> float:
    """``steps`` optimizer steps on seeded random tokens; the last step's loss."""
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (2, 16), generator=generator)
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss)
