"""Demo: guards catching a learning rate blown up mid-run, and damping it.

    python examples/guards.py [--steps 60] [--blow-up-at 30] [--factor 80] [--no-guards]

A tiny GPT trains with SGD (momentum 0.9); at ``--blow-up-at`` the learning rate
is multiplied by ``--factor``. The gradient norm then grows step over step
(``llm_grad_norm_decay_rate`` below -0.1 on two sampled steps), so
``clip_on_rebound`` clips the gradients at 1.0 from the next step on; an update
whose gradients went NaN/Inf would be skipped by ``skip_nonfinite``. Each action
is a warning line and ``llm_guard_actions_total{llm_guard_action="clip_on_rebound"}``.
With the defaults the guarded run ends with finite parameters; with
``--no-guards`` the same run ends in NaN. Try PromQL
``increase(llm_guard_actions_total[5m])`` next to ``llm_grad_norm``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch
import torch.nn.functional as F
from train import TinyGPT

import otel_llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--blow-up-at", type=int, default=30)
    parser.add_argument("--factor", type=float, default=80.0, help="what the learning rate is multiplied by")
    parser.add_argument("--no-guards", action="store_true", help="the same run without guards")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep serving after training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guards = "none" if args.no_guards else "skip_nonfinite,lr_backoff,clip_on_rebound"
    config = otel_llm.Config(sampling="fixed", sampling_interval=2, guards=guards, guard_clip_patience=2,
                             guard_clip_steps=200)
    with otel_llm.instrument(model, optimizer, config=config) as telemetry:
        print(f"otel_llm: scrape {telemetry.prometheus_url or '(Prometheus endpoint disabled)'}")
        print("otel_llm: try PromQL  increase(llm_guard_actions_total[5m])  and  llm_grad_norm")
        telemetry.on_guard(lambda action: print(f"step {action.step:5d}  {action.action}"))
        losses = []
        for step in range(args.steps):
            if step == args.blow_up_at:
                print(f"step {step:5d}  learning rate x{args.factor:g}")
                for group in optimizer.param_groups:
                    group["lr"] *= args.factor
            batch = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(step))
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        finite = all(math.isfinite(p.detach().sum().item()) for p in model.parameters())
        print(f"loss before the blow-up {losses[args.blow_up_at - 1]:.3f}, at the end {losses[-1]:.3f}; "
              f"parameters {'finite' if finite else 'NaN/Inf'}")
        if args.hold > 0:
            time.sleep(args.hold)
    print("done")


if __name__ == "__main__":
    main()
