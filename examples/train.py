"""Demo: train a tiny GPT on CPU with otel_llm exporting every signal.

    python examples/train.py                 # Prometheus on 127.0.0.1:9464 + OTLP to localhost:4317
    python examples/train.py --steps 2000 --hold 60

While it runs, scrape http://127.0.0.1:9464/metrics or point Prometheus at it
and query e.g. ``llm_grad_norm`` or
``histogram_quantile(0.5, rate(llm_loss_token_bucket[1m]))``. OTLP goes to the
collector named by the standard OTEL_EXPORTER_OTLP_* variables.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import otel_llm


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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep serving after training")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    text = torch.tensor([int(127 + 100 * math.sin(i / 7)) % 256 for i in range(20_000)])

    with otel_llm.instrument(model, optimizer) as telemetry:
        print(f"otel_llm: scrape {telemetry.prometheus_url or '(Prometheus endpoint disabled)'}")
        print("otel_llm: try PromQL  llm_grad_norm  or  "
              "histogram_quantile(0.5, rate(llm_loss_token_bucket[1m]))")
        for step in range(args.steps):
            starts = torch.randint(0, len(text) - 65, (8,))
            batch = torch.stack([text[s:s + 65] for s in starts])
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0:
                print(f"step {step:5d}  loss {loss.item():.3f}")
        if args.hold > 0:
            print(f"otel_llm: training done; serving for {args.hold:g} s more")
            time.sleep(args.hold)
    print("done")


if __name__ == "__main__":
    main()
