"""Demo: adaptive sampling and SAX anomaly detection catching a learning rate blown up mid-run.

    python examples/anomaly_lr_blowup.py [--steps 300] [--blow-up-at 200]

The first 20 steps are sampled one by one, the warm-up thins out to step 100,
then the interval grows (the growth is shortened here so a short run shows it,
and the detector's baseline to 32 samples so it judges before the blow-up). At ``--blow-up-at`` the
learning rate is multiplied by 1000: the detector logs a warning per flagged
signal, ``llm_anomaly_events_total`` rises for the gradient signals and
``llm_telemetry_sampling_interval`` drops back to its minimum. Try PromQL
``increase(llm_anomaly_events_total[5m])`` next to ``llm_grad_norm``.
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F
from train import TinyGPT

import otel_llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--blow-up-at", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = otel_llm.Config(sampling="adaptive", sampling_growth_steps=20, sampling_max_interval=80,
                             anomaly_baseline=32)
    with otel_llm.instrument(model, optimizer, config=config) as telemetry:
        print(f"otel_llm: scrape {telemetry.prometheus_url or '(Prometheus endpoint disabled)'}")
        print("otel_llm: try PromQL  increase(llm_anomaly_events_total[5m])  and  llm_telemetry_sampling_interval")
        interval = telemetry.sampling_interval
        for step in range(args.steps):
            if step == args.blow_up_at:
                print(f"step {step:5d}  learning rate x1000")
                for group in optimizer.param_groups:
                    group["lr"] *= 1000
            batch = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(step))
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if telemetry.sampling_interval != interval:
                interval = telemetry.sampling_interval
                print(f"step {step:5d}  sampling interval now {interval}")
    print("done")


if __name__ == "__main__":
    main()
