"""Step-time overhead of otel_llm, side by side with ``wandb.watch(log="all")``, on CPU.

Two workloads: ``llama`` (LlamaForCausalLM, vocab 1024, hidden 256, 4 layers, 8 heads,
batch 4 x 128, AdamW) and ``nanogpt`` (a GPT of nanoGPT's shape — learned positions,
pre-LayerNorm blocks, fused ``F.scaled_dot_product_attention``, tied embeddings — at
4 layers, width 96, batch 4 x 64: the fastest steps this CPU runs). Every variant of a
workload runs in the same process on the same model and optimizer, in interleaved
blocks, so machine noise hits them alike; each block instruments (or calls
``wandb.init(mode="offline")`` + ``wandb.watch``), trains, and shuts down outside the
timed steps. The table shows the mean step time (what a run pays; the median hides
periodic work such as a sampled step every 10) and the median. A ratio to bare is
taken within each round (a block of the variant over the bare block beside it) and
the table shows the median over rounds: a stall of the machine during one block
moves one round's ratio, not the result. Blocks are a multiple of 10 steps, so every
block of the fixed-every-10 variant holds the same share of sampled steps.

Variants: bare; otel_llm's default policy past its warm-up; fixed every 10th step;
every step (the cost of a sampled step); never sampled (the cost of an unsampled step:
hooks and counters only); ``wandb.watch(log="all")`` offline at log_freq 10 and 1 (its
hooks compute the histograms inside backward; the loop calls no ``wandb.log``, so the
row is wandb's lower bound). The whole-run row composes the measured costs over the
default policy's schedule of a 2,000-step run::

    whole = (S * sampled + (2000 - S) * unsampled) / 2000

with S the sampled steps of that schedule when no spike or anomaly tightens it
(warm-up plus every ``sampling_min_interval``-th step; the policy samples less on plateaus
and after growth), and ``sampled``/``unsampled`` the every-step and never-sampled rows.

    python benchmarks/overhead.py [--workload llama|nanogpt|both] [--blocks 8] [--steps 20]

``pip install -e ".[bench]"`` installs wandb; without it the wandb rows say so.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import otel_llm  # noqa: E402
from otel_llm.pipeline.sampler import make_sampler  # noqa: E402

RUN_STEPS = 2000


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A GPT of nanoGPT's architecture: the loop below trains it the way nanoGPT's train.py does."""

    def __init__(self, vocab: int = 512, width: int = 96, layers: int = 4, heads: int = 4,
                 block_size: int = 64) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block_size, width)
        self.h = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor], torch.Tensor]
    batch: tuple[int, int]
    vocab: int


def llama() -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=256))
    return Workload("llama", "LlamaForCausalLM (vocab 1024, hidden 256, 4 layers, 8 heads), batch 4x128, AdamW",
                    model, torch.optim.AdamW(model.parameters(), lr=1e-4),
                    lambda ids: model(input_ids=ids, labels=ids).loss, (4, 128), 1024)


def nanogpt() -> Workload:
    model = TinyGPT()
    return Workload("nanogpt", "nanoGPT-shaped GPT (vocab 512, width 96, 4 layers, 4 heads), batch 4x64, AdamW",
                    model, torch.optim.AdamW(model.parameters(), lr=1e-4),
                    lambda ids: model(ids[:, :-1], ids[:, 1:]), (4, 65), 512)


def _otel(options: dict[str, object]) -> Callable[[Workload], contextlib.AbstractContextManager[None]]:
    @contextlib.contextmanager
    def instrumented(work: Workload) -> Iterator[None]:
        config = otel_llm.Config(exporters="prometheus", prometheus_port=0, **options)  # type: ignore[arg-type]
        session = otel_llm.instrument(work.model, work.optimizer, config=config)
        try:
            yield
        finally:
            session.shutdown()

    return instrumented


def _wandb(log_freq: int) -> Callable[[Workload], contextlib.AbstractContextManager[None]]:
    @contextlib.contextmanager
    def watched(work: Workload) -> Iterator[None]:
        import wandb

        with tempfile.TemporaryDirectory() as directory:
            run = wandb.init(mode="offline", dir=directory, project="otel-llm-overhead")
            wandb.watch(work.model, log="all", log_freq=log_freq)
            try:
                yield
            finally:
                wandb.unwatch(work.model)
                run.finish()

    return watched


@contextlib.contextmanager
def _bare(work: Workload) -> Iterator[None]:
    yield


DEFAULT_PAST_WARMUP = {"sampling_warmup": 0}
VARIANTS: dict[str, Callable[[Workload], contextlib.AbstractContextManager[None]]] = {
    "bare": _bare,
    "otel_llm default, past warm-up": _otel(DEFAULT_PAST_WARMUP),
    "otel_llm fixed every 10": _otel({"sampling": "fixed", "sampling_interval": 10}),
    "otel_llm every step (sampled step)": _otel({"sampling": "fixed", "sampling_interval": 1}),
    "otel_llm never sampled (unsampled step)": _otel({"sampling": "fixed", "sampling_interval": 10**6}),
    "wandb.watch(log='all', log_freq=10)": _wandb(10),
    "wandb.watch(log='all', log_freq=1)": _wandb(1),
}


def _has_wandb() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def run_block(work: Workload, variant: Callable[[Workload], contextlib.AbstractContextManager[None]],
              steps: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    times: list[float] = []
    with variant(work):
        for step in range(steps + 2):
            ids = torch.randint(0, work.vocab, work.batch, generator=generator)
            started = time.perf_counter()
            work.loss(ids).backward()
            work.optimizer.step()
            work.optimizer.zero_grad(set_to_none=True)
            if step >= 2:  # the first steps of a block warm caches (and, never sampled, skip step 0)
                times.append(time.perf_counter() - started)
    return times


def sampled_steps_of_default_run(steps: int) -> int:
    """Sampled steps of the default policy over ``steps`` quiet steps (no spike, anomaly or plateau)."""
    from otel_llm.pipeline.sampler import SamplingInputs

    sampler = make_sampler(otel_llm.Config())
    sampled = 0
    for step in range(steps):
        if sampler.is_sampled(step):
            sampled += 1
            sampler.update(step, SamplingInputs(loss=math.nan if step == 0 else 1.0 + step % 7 * 0.1))
    return sampled


Variant = Callable[[Workload], contextlib.AbstractContextManager[None]]


def measure(work: Workload, blocks: int, steps: int,
            variants: dict[str, Variant] | None = None) -> dict[str, list[list[float]]]:
    """Per variant, the step times of each of its ``blocks`` blocks (one block of every variant per round)."""
    if variants is None:
        variants = {name: make for name, make in VARIANTS.items() if not name.startswith("wandb") or _has_wandb()}
    samples: dict[str, list[list[float]]] = {name: [] for name in variants}
    run_block(work, _bare, 5, seed=0)
    for block in range(blocks):
        for name, variant in variants.items():
            samples[name].append(run_block(work, variant, steps, seed=block))
    return samples


def paired_ratio(blocks: list[list[float]], bare: list[list[float]]) -> float:
    """Median over rounds of the block's mean step time over the bare block's of the same round."""
    return statistics.median(statistics.fmean(times) / statistics.fmean(base) for times, base in zip(blocks, bare))


def report(work: Workload, samples: dict[str, list[list[float]]], blocks: int, steps: int) -> None:
    pooled = {name: [t for block in times for t in block] for name, times in samples.items()}
    bare = samples["bare"]
    bare_median = statistics.median(pooled["bare"])
    means = {name: statistics.fmean(times) for name, times in pooled.items()}
    ratios = {name: paired_ratio(times, bare) for name, times in samples.items()}
    print(f"\n{work.description}; CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{blocks} interleaved rounds x {steps} steps per variant")
    print(f"| {'variant':<42} | mean ms | mean / bare | median ms | median / bare |")
    print(f"|{'-' * 44}|---:|---:|---:|---:|")
    for name, times in pooled.items():
        median = statistics.median(times)
        print(f"| {name:<42} | {means[name] * 1e3:.2f} | {ratios[name]:.3f} | {median * 1e3:.2f} | "
              f"{median / bare_median:.3f} |")
    sampled_steps = sampled_steps_of_default_run(RUN_STEPS)
    sampled, unsampled = "otel_llm every step (sampled step)", "otel_llm never sampled (unsampled step)"
    whole = (sampled_steps * means[sampled] + (RUN_STEPS - sampled_steps) * means[unsampled]) / RUN_STEPS
    whole_ratio = (sampled_steps * ratios[sampled] + (RUN_STEPS - sampled_steps) * ratios[unsampled]) / RUN_STEPS
    print(f"| {f'otel_llm default, whole {RUN_STEPS}-step run*':<42} | {whole * 1e3:.2f} | {whole_ratio:.3f} "
          f"| | |")
    print(f"\n* composed: {sampled_steps} sampled steps (warm-up included) x the every-step cost + "
          f"{RUN_STEPS - sampled_steps} unsampled x the never-sampled cost")
    if not _has_wandb():
        print('wandb is not installed (pip install -e ".[bench]"): no wandb.watch rows')
        return
    for frequency, ours in ((10, "otel_llm fixed every 10"), (1, sampled)):
        theirs = ratios[f"wandb.watch(log='all', log_freq={frequency})"] - 1
        print(f"overhead at log_freq {frequency}: otel_llm {ratios[ours] - 1:+.1%}, "
              f"wandb.watch {theirs:+.1%}, ratio {(ratios[ours] - 1) / theirs:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("llama", "nanogpt", "both"), default="both")
    parser.add_argument("--blocks", type=int, default=8, help="rounds of the interleaved variants")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block (nanogpt: 4x as many)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    chosen = ("llama", "nanogpt") if args.workload == "both" else (args.workload,)
    for name in chosen:
        work = llama() if name == "llama" else nanogpt()
        steps = args.steps * (4 if name == "nanogpt" else 1)
        report(work, measure(work, args.blocks, steps), args.blocks, steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
