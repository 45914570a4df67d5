"""A plain PyTorch training loop with no telemetry code; run it under ``opentelemetry-instrument``.

    OTEL_METRICS_EXPORTER=prometheus,otlp opentelemetry-instrument python examples/zero_code/train.py

otel_llm's configurator and instrumentor (installed entry points) find the
optimizer, the model and the ``F.cross_entropy`` loss as they first run, and
export ``llm_train_loss``, ``llm_train_tokens_total``, ``llm_grad_norm``,
``llm_param_update_ratio``, ``llm_loss_token_bucket`` and the per-layer
``llm_attention_logit_max`` with nothing changed here. Try PromQL
``llm_grad_norm`` or ``max by (llm_layer) (llm_attention_logit_max)``.
See README.md beside this file.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, block: int = 64, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep the process alive after training")
    args = parser.parse_args()

    # Only a hint for this demo: where the launcher's Prometheus endpoint listens by default.
    port = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")
    print(f"otel_llm: scrape http://127.0.0.1:{port}/metrics (when run under opentelemetry-instrument)", flush=True)
    print("otel_llm: try PromQL  llm_grad_norm  or  max by (llm_layer) (llm_attention_logit_max)", flush=True)

    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.randint(0, 256, (20_000,))
    for step in range(args.steps):
        starts = torch.randint(0, len(text) - 65, (8,))
        batch = torch.stack([text[s:s + 65] for s in starts])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)
    print(f"trained {args.steps} steps", flush=True)
    if args.hold > 0:
        time.sleep(args.hold)


if __name__ == "__main__":
    main()
