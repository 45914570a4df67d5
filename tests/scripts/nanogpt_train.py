"""A plain nanoGPT-style training script: no otel_llm import, nothing telemetry-aware.

Run it under ``opentelemetry-instrument python tests/scripts/nanogpt_train.py``
to exercise the zero-code path. Environment:

* ``TRAIN_STEPS`` (default 40): optimizer steps to take;
* ``TRAIN_HOLD_FILE``: when set, after training wait (at most 60 s) until this
  file exists before exiting, so a test can scrape the live process.
"""

from __future__ import annotations

import math
import os
import pathlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 64, block_size: int = 32, dim: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, dim), wpe=nn.Embedding(block_size, dim),
            h=nn.ModuleList([Block(dim, heads) for _ in range(layers)]), ln_f=nn.LayerNorm(dim)))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.5 / math.sqrt(p.shape[-1]))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def hold() -> None:
    """Wait (at most 60 s) for TRAIN_HOLD_FILE to exist, when it is set."""
    path = os.environ.get("TRAIN_HOLD_FILE")
    if not path:
        return
    deadline = time.monotonic() + 60.0
    while not pathlib.Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    steps = int(os.environ.get("TRAIN_STEPS", "40"))
    vocab, block_size, batch = 64, 32, 4
    torch.manual_seed(0)
    model = GPT(vocab=vocab, block_size=block_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    for step in range(steps):
        idx = torch.randint(0, vocab, (batch, block_size))
        targets = torch.roll(idx, -1, dims=1)
        targets[:, -1] = -1  # nanoGPT's ignore_index for the last position
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    print(f"trained {steps} steps", flush=True)
    hold()
    print("done", flush=True)


if __name__ == "__main__":
    main()
