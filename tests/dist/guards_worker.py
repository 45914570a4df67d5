"""torchrun worker: each rank sees its own scripted decay rates; the guards must act alike on every rank.

No DDP: every rank trains its own :class:`~tests.support.scripted.Scripted` model, so
the ranks' gradient norms (and decay rates) differ as the script says. Each rank
writes the actions it took and its learning rates to ``<out>/rank<k>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import otel_llm  # noqa: E402
from tests.support.scripted import Scripted, norms_for  # noqa: E402

STEPS = 16
DECAYS = {
    # rank 0 alone: backoff at 6, never clips; rank 1 alone: 4 breaks its backoff streak, clips after 10
    0: {2: 0.9, 4: 0.9, 6: 0.9, 8: 0.0, 10: 0.0, 12: 0.0, 14: 0.0},
    1: {2: 0.9, 4: 0.5, 6: 0.9, 8: -1.0, 10: -1.0, 12: 0.0, 14: 0.0},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    model = Scripted()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = otel_llm.Config(exporters="none", sampling="fixed", sampling_interval=2,
                             guards="lr_backoff,clip_on_rebound", guard_lr_backoff_patience=3,
                             guard_clip_patience=2, guard_clip_steps=2)
    actions = []
    with otel_llm.instrument(model, optimizer, config=config) as telemetry:
        telemetry.on_guard(lambda action: actions.append([action.action, action.step]))
        lrs = []
        for norm in norms_for(DECAYS[rank], STEPS):
            model.loss(norm).backward()
            optimizer.step()
            optimizer.zero_grad()
            lrs.append(optimizer.param_groups[0]["lr"])
    (args.out / f"rank{rank}.json").write_text(json.dumps({"actions": actions, "lrs": lrs}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
