"""Step-time cost of otel_llm's DeepSpeed source on a sampled step (ZeRO-1/2/3, CPU, gloo).

Three variants interleaved in one run per stage (bare engine; otel_llm with only the
optimizer family, every step sampled — the DeepSpeed source alone; every signal,
every step) so machine noise hits them alike. Rank 0 prints the mean and median
step time per variant and the ratio to bare.

    torchrun --nproc_per_node=2 benchmarks/deepspeed_overhead.py [--blocks 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import otel_llm  # noqa: E402
from otel_llm.catalog import CATALOG, family_signals  # noqa: E402

VOCAB, WIDTH, LAYERS = 1024, 256, 4

ONLY_OPTIMIZER = tuple(name for family in sorted({spec.family for spec in CATALOG} - {"optimizer", "training",
                                                                                        "telemetry"})
                       for name in family_signals(family))
VARIANTS = {"bare": None,
            "optimizer signals, every step": {"sampling_interval": 1, "disabled_signals": ONLY_OPTIMIZER},
            "all signals, every step": {"sampling_interval": 1}}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Embedding(VOCAB, WIDTH)]
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.GELU(), torch.nn.Linear(4 * WIDTH, WIDTH)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, VOCAB))


def block(engine, optimizer, steps: int, options: dict | None) -> list[float]:
    session = (otel_llm.instrument(engine, optimizer, config=otel_llm.Config(exporters="none", **options))
               if options is not None else None)
    generator = torch.Generator().manual_seed(dist.get_rank())
    times = []
    try:
        for _ in range(steps):
            idx = torch.randint(0, VOCAB, (8, 64), generator=generator)
            dist.barrier()
            start = time.perf_counter()
            loss = F.cross_entropy(engine(idx).reshape(-1, VOCAB), idx.reshape(-1))
            engine.backward(loss)
            engine.step()
            times.append(time.perf_counter() - start)
    finally:
        if session is not None:
            session.shutdown()
    return times[2:]  # the first steps of a block warm caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stages", default="1,2,3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rows = []
    for stage in (int(s) for s in args.stages.split(",")):
        net = model()
        client = torch.optim.AdamW(net.parameters(), lr=1e-3)
        config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
        engine, optimizer, _, _ = deepspeed.initialize(model=net, optimizer=client, config=config)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.blocks):
            for name, options in VARIANTS.items():
                times[name] += block(engine, optimizer, args.steps, options)
        bare = statistics.fmean(times["bare"])
        for name, values in times.items():
            mean = statistics.fmean(values)
            rows.append((f"ZeRO-{stage}", name, mean * 1e3, statistics.median(values) * 1e3, mean / bare))
        engine.destroy()
    if dist.get_rank() == 0:
        print(f"{'stage':<7} {'variant':<32} {'mean ms':>8} {'median ms':>10} {'mean / bare':>12}")
        for stage, name, mean, median, ratio in rows:
            print(f"{stage:<7} {name:<32} {mean:8.2f} {median:10.2f} {ratio:12.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
