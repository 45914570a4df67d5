"""Step-time overhead of otel_llm on a tiny Llama on CPU.

Five variants are interleaved in one process (bare; the default adaptive policy
past its warm-up, i.e. every 10th step with the SAX detector running; fixed
every 10th step; every-step sampling with all signals; every-step sampling
without the attention and RoPE probes) so machine noise hits them alike; each block instruments, trains, and
shuts down. Prints the mean step time (what a run pays) and the median per variant, with ratios to bare.

    python benchmarks/overhead.py [--blocks 6] [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import otel_llm  # noqa: E402


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def run_block(model, optimizer, steps: int, options: dict | None) -> list[float]:
    session = None
    if options is not None:
        config = otel_llm.Config(exporters="prometheus", prometheus_port=0, **options)
        session = otel_llm.instrument(model, optimizer, config=config)
    g = torch.Generator().manual_seed(0)
    times = []
    try:
        for _ in range(steps):
            ids = torch.randint(0, 512, (4, 128), generator=g)
            start = time.perf_counter()
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    finally:
        if session is not None:
            session.shutdown()
    return times[2:]  # the first steps of a block warm caches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6, help="rounds of the interleaved variants")
    parser.add_argument("--steps", type=int, default=40, help="steps per block")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    variants = {
        "bare": None,
        "adaptive past warm-up": {"sampling": "adaptive", "sampling_warmup": 0},
        "fixed every 10": {"sampling": "fixed", "sampling_interval": 10},
        "every step": {"sampling": "fixed", "sampling_interval": 1},
        "every step, no attention/RoPE": {"sampling": "fixed", "sampling_interval": 1,
                                          "disabled_signals": "llm.attention.*,llm.rope.*"},
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    run_block(model, optimizer, 5, None)  # warm-up
    for _ in range(args.blocks):
        for name, options in variants.items():
            samples[name].extend(run_block(model, optimizer, args.steps, options))
    bare_mean, bare_median = statistics.fmean(samples["bare"]), statistics.median(samples["bare"])
    print(f"tiny Llama (4 layers, hidden 128, batch 4x128) on CPU, torch {torch.__version__}, "
          f"{args.blocks} blocks x {args.steps} steps per variant")
    print(f"{'variant':<32}{'mean step (ms)':>16}{'mean ratio':>12}{'median step (ms)':>18}{'median ratio':>14}")
    for name, times in samples.items():
        mean, median = statistics.fmean(times), statistics.median(times)
        print(f"{name:<32}{mean * 1e3:>16.2f}{mean / bare_mean:>12.3f}{median * 1e3:>18.2f}"
              f"{median / bare_median:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
