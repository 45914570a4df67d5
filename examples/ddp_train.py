"""Data-parallel demo: every rank exports its own series, labelled by rank.

    torchrun --nproc_per_node=2 examples/ddp_train.py [--steps 200]

Local rank k serves Prometheus on 9464 + k (OTEL_EXPORTER_PROMETHEUS_PORT sets the
base); OTLP carries llm.rank / llm.world_size as resource attributes. Try PromQL
``llm_param_update_variance_ratio`` (0 while replicas agree) or
``sum by (llm_rank) (rate(llm_train_tokens_total[1m]))``.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import otel_llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Embedding(256, 64), nn.Linear(64, 256), nn.GELU(),
                                                  nn.Linear(256, 256)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(rank)
    with otel_llm.instrument(model, optimizer) as telemetry:
        print(f"rank {rank}: scrape {telemetry.prometheus_url}", flush=True)
        for step in range(args.steps):
            idx = torch.randint(0, 256, (8, 32), generator=generator)
            loss = F.cross_entropy(model(idx).reshape(-1, 256), idx.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if rank == 0 and step % 50 == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
