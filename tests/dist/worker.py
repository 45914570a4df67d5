"""torchrun worker for the distributed tests (gloo on CPU).

Each rank trains a tiny GPT under otel_llm with an in-memory reader, computes
independent references with plain torch collectives, and writes its results
to ``<out>/rank<k>.json`` for the test to check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

import otel_llm  # noqa: E402
from tests.models import GPT  # noqa: E402

VOCAB = 64


def gauges(reader: InMemoryMetricReader) -> dict[str, float]:
    out: dict[str, float] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    if hasattr(point, "value"):
                        out[metric.name] = point.value
    return out


def batch(step: int, rank: int, size: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, 16), generator=torch.Generator().manual_seed(1000 * step + rank))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def run_ddp(args: argparse.Namespace, rank: int, world: int) -> dict:
    """DDP: replicas agree (r ~ 0); rank 1's parameters are perturbed before step 2."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(GPT(vocab=VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    reader = InMemoryMetricReader()
    session = otel_llm.Instrumentation(model, optimizer, extra_readers=[reader],
                                       config=otel_llm.Config(sampling_interval=1, exporters="none"))
    steps = []
    for step in range(4):
        if step == 2 and rank == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
        idx = batch(step, rank)
        _, loss = model(idx, idx)
        loss.backward()
        before = flat(model.parameters())
        optimizer.step()
        delta = flat(model.parameters()) - before
        optimizer.zero_grad()
        everyone = [torch.zeros_like(delta) for _ in range(world)]
        dist.all_gather(everyone, delta)
        stacked = torch.stack(everyone)
        reference = float(stacked.var(dim=0, unbiased=False).sum() / stacked.square().sum(dim=1).mean())
        session.flush(5.0)
        steps.append({"exported": gauges(reader)["llm.param.update_variance_ratio"], "reference": reference})
    session.shutdown()
    return {"steps": steps}


def run_fsdp(args: argparse.Namespace, rank: int, world: int) -> dict:
    """FSDP2: exported values are global, equal to one process training on the global batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    reference_model = GPT(vocab=VOCAB)
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    reference_optimizer = torch.optim.AdamW(reference_model.parameters(), lr=1e-2, weight_decay=0.1)
    reader = InMemoryMetricReader()
    session = otel_llm.Instrumentation(model, optimizer, extra_readers=[reader],
                                       config=otel_llm.Config(sampling_interval=1, exporters="none"))
    steps = []
    for step in range(3):
        idx = batch(step, rank)
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.flush(5.0)
        exported = gauges(reader)

        global_idx = torch.cat([batch(step, r) for r in range(world)])
        _, reference_loss = reference_model(global_idx, global_idx)
        reference_loss.backward()
        grads = flat(p.grad for p in reference_model.parameters())
        before = flat(reference_model.parameters())
        reference_optimizer.step()
        delta = flat(reference_model.parameters()) - before
        reference_optimizer.zero_grad()
        steps.append({
            "exported": {k: exported[k] for k in ("llm.grad.norm", "llm.grad.sparsity", "llm.param.update_ratio")},
            "reference": {"llm.grad.norm": float(grads.norm()),
                          "llm.grad.sparsity": float((grads.abs() <= 1e-5).double().mean()),
                          "llm.param.update_ratio": float(delta.norm() / before.norm())},
        })
    session.shutdown()
    return {"steps": steps}


def run_export(args: argparse.Namespace, rank: int, world: int) -> dict:
    """Many steps with the real readers (Prometheus per local rank, OTLP) and sampling from the environment."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(GPT(vocab=VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    session = otel_llm.instrument(model, optimizer)
    for step in range(args.steps):
        idx = batch(step, rank)
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    session.flush(5.0)
    url = session.prometheus_url
    dist.barrier()
    hold = Path(args.out) / "release"
    deadline = time.monotonic() + 60
    while not hold.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    session.shutdown()
    return {"prometheus_url": url, "steps": session.step}


def run_dies(args: argparse.Namespace, rank: int, world: int) -> dict:
    """Rank 1 dies before a sampled step's update: rank 0's telemetry collective must not hang."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(GPT(vocab=VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    session = otel_llm.Instrumentation(model, optimizer,
                                       config=otel_llm.Config(sampling_interval=1, exporters="none"))
    for step in range(3):
        idx = batch(step, rank)
        _, loss = model(idx, idx)
        loss.backward()
        if step == 2 and rank == 1:
            os._exit(0)
        started = time.monotonic()
        optimizer.step()  # the post-step hook all-reduces the update sample on this sampled step
        optimizer.zero_grad()
    result = {"rank": rank, "world": world, "local_rank": 0, "last_step_seconds": time.monotonic() - started,
              "steps": session.step}
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # the group lost a member: tearing it down would wait on the dead rank


def run_adaptive(args: argparse.Namespace, rank: int, world: int) -> dict:
    """Adaptive sampling with per-rank losses: separate models, rank-specific data and a spike on rank 1 only."""
    torch.manual_seed(rank)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = otel_llm.Config(exporters="none", sampling="adaptive", sampling_warmup=10, sampling_min_interval=3,
                             sampling_max_interval=24, sampling_growth_steps=15, sampling_loss_window=8)
    session = otel_llm.Instrumentation(model, optimizer, config=config)
    sampled, losses = [], []
    for step in range(args.steps):
        if session.sampled:
            sampled.append(step)
        idx = batch(step, rank)
        _, loss = model(idx, idx)
        if rank == 1 and 60 <= step < 90:
            loss = loss * 30  # only rank 1's loss spikes
            session.record_loss(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    session.shutdown()
    return {"sampled": sampled, "losses": losses}


def run_slow_rank(args: argparse.Namespace, rank: int, world: int) -> dict:
    """Separate models; rank 1's input takes 50 ms longer per step. Each rank times its own steps."""
    torch.manual_seed(rank)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reader = InMemoryMetricReader()
    updated: list[float] = []  # the end of each update, before otel_llm's own hook publishes it
    optimizer.register_step_post_hook(lambda *_: updated.append(time.perf_counter()))
    config = otel_llm.Config(exporters="none", sampling="adaptive", sampling_warmup=0, sampling_min_interval=10)
    session = otel_llm.Instrumentation(model, optimizer, config=config, extra_readers=[reader])
    sampled, busy = [], []
    for step in range(args.steps):
        if session.sampled:
            sampled.append(step)
        started = time.perf_counter()
        if rank == 1:
            time.sleep(0.05)  # a slow input pipeline on rank 1 only
        idx = batch(step, rank)
        model(idx, idx)[1].backward()
        optimizer.step()
        busy.append(updated[-1] - started)  # input + compute, without otel_llm's publishing
        optimizer.zero_grad()
    assert session.flush(5.0)
    result = {"sampled": sampled, "busy": busy, "gauges": gauges(reader)}
    session.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("ddp", "fsdp", "export", "dies", "adaptive", "slow"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"ddp": run_ddp, "fsdp": run_fsdp, "export": run_export, "dies": run_dies, "adaptive": run_adaptive,
              "slow": run_slow_rank}[args.mode](args, rank, world)
    result.update(rank=rank, world=world, local_rank=int(os.environ["LOCAL_RANK"]))
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
