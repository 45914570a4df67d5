"""What each probe family adds to a sampled step: every-step sampling with all signals, and with one family off.

Same workloads and interleaving as ``overhead.py``; the cost of a family is the mean
step time with all signals minus the mean with that family's signals disabled (what a
user saves by disabling it), as a share of the bare step, taken within each round and
the median over rounds shown.

    python benchmarks/probe_cost.py [--workload llama|nanogpt] [--blocks 8] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from overhead import _bare, _otel, llama, measure, nanogpt

FAMILIES = {
    "optimizer (gradients, update)": "llm.grad.*,llm.param.*",
    "loss (per-token loss, z-loss)": "llm.loss.*,llm.logits.*",
    "attention": "llm.attention.*",
    "rope": "llm.rope.*",
    "activations": "llm.activation.*",
    "memory": "llm.memory.*",
}
EVERY_STEP = {"sampling": "fixed", "sampling_interval": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("llama", "nanogpt"), default="llama")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    work = llama() if args.workload == "llama" else nanogpt()
    variants = {"bare": _bare, "all signals": _otel(EVERY_STEP)}
    variants |= {f"without {name}": _otel({**EVERY_STEP, "disabled_signals": signals})
                 for name, signals in FAMILIES.items()}
    samples = measure(work, args.blocks, args.steps, variants)
    rounds = list(zip(*samples.values()))
    names = list(samples)

    def share(round_blocks: tuple[list[float], ...], name: str) -> float:
        means = dict(zip(names, map(statistics.fmean, round_blocks)))
        return (means["all signals"] - means[name]) / means["bare"]

    bare = statistics.fmean(t for block in samples["bare"] for t in block)
    full = statistics.median(share(blocks, "bare") for blocks in rounds)
    print(f"{work.description}; every step sampled; {args.blocks} rounds x {args.steps} steps per variant")
    print(f"bare {bare * 1e3:.2f} ms, all signals {full:+.1%}")
    print("| family | ms per sampled step | share of the bare step |")
    print("|---|---:|---:|")
    for name in FAMILIES:
        cost = statistics.median(share(blocks, f"without {name}") for blocks in rounds)
        print(f"| {name} | {cost * bare * 1e3:.2f} | {cost:+.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
