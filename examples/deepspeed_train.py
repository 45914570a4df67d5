"""DeepSpeed ZeRO demo: global gradient and update signals from the engine's flat partitions.

    torchrun --nproc_per_node=2 examples/deepspeed_train.py [--stage 2] [--steps 100] [--bf16] [--hold N]
    deepspeed --num_gpus 2 examples/deepspeed_train.py --stage 3

Runs on CPU (DeepSpeed's CPU accelerator, gloo) when no GPU is present. The engine's
optimizer is passed as it is; every rank exports the same llm_grad_norm (the
pre-clip norm DeepSpeed itself logs), llm_grad_sparsity and llm_param_update_ratio,
as if one process trained on the global batch. Try PromQL ``llm_grad_norm`` or
``rate(llm_train_skipped_steps_total[5m])`` (updates DeepSpeed skipped for an fp16 overflow).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import otel_llm  # noqa: E402

VOCAB = 256


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, 64), nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(),
                         nn.Linear(256, VOCAB))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--hold", type=float, default=0.0, help="keep serving this many seconds at the end")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    net = model()
    decay = [p for p in net.parameters() if p.dim() > 1]
    no_decay = [p for p in net.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": args.stage}, "bf16": {"enabled": args.bf16}, "steps_per_print": 10 ** 9}
    engine, engine_optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    rank = engine.global_rank
    generator = torch.Generator().manual_seed(rank)
    with otel_llm.instrument(engine, engine_optimizer) as telemetry:
        print(f"rank {rank}: ZeRO-{args.stage} with {type(engine_optimizer).__name__}; "
              f"scrape {telemetry.prometheus_url}", flush=True)
        for step in range(args.steps):
            idx = torch.randint(0, VOCAB, (8, 32), generator=generator).to(engine.device)
            logits = engine(idx)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), idx.reshape(-1))
            engine.backward(loss)
            engine.step()
            if step % 20 == 0 and rank == 0:
                print(f"step {step}: loss {loss.item():.3f}, grad norm {engine.get_global_grad_norm():.3f}",
                      flush=True)
        time.sleep(args.hold)
    print(f"rank {rank}: done, {telemetry.step} steps", flush=True)


if __name__ == "__main__":
    main()
