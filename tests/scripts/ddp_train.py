"""An unmodified DDP training script (no otel_llm import), launched by torchrun.

TRAIN_STEPS (default 30) steps of a tiny model on random tokens; afterwards, if
TRAIN_HOLD_FILE is set, waits up to 60 s for that file so a test can scrape.
"""

import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        return self.head(x + self.mlp(x))


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(TinyLM())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    for _ in range(int(os.environ.get("TRAIN_STEPS", "30"))):
        idx = torch.randint(0, 64, (4, 16), generator=g)
        loss = F.cross_entropy(model(idx).view(-1, 64), idx.view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dist.barrier()
    hold = os.environ.get("TRAIN_HOLD_FILE")
    deadline = time.monotonic() + 60
    while hold and not os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.1)
    dist.barrier()
    dist.destroy_process_group()
    print("done", rank)


if __name__ == "__main__":
    main()
