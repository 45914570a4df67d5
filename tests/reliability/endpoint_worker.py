"""A training process instrumented with ``otel_llm.instrument()``, for the endpoint reliability tests.

Run directly or under ``torchrun`` (gloo on CPU, DDP when the world has more
than one rank). Everything otel_llm exports is configured by the environment,
as in a real job. The process trains a tiny GPT until ``<out>/stop`` exists
(or for ``--steps`` steps and then waits for it), so tests can scrape it
while it trains. Per rank it writes ``<out>/rank<k>.json`` once it serves
(scrape URL, pid) and again at exit (steps), and ``<out>/rank<k>.log`` with
every otel_llm warning. Extra command-line arguments (``--token``) are
accepted and ignored: they stand for secrets a real job passes this way.
``--checkpoint DIR`` saves the model with ``torch.save`` after every step and
counts the saves that failed; ``--nofile N`` lowers the process's open-file
limit first, as a job under ``ulimit -n`` has it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import otel_llm  # noqa: E402
from tests.models import GPT  # noqa: E402

VOCAB = 64
HOLD_LIMIT_S = 180.0
"""Longest the worker waits for the stop file, so a failed test never leaves it behind."""


def write_status(out: Path, rank: int, status: dict) -> None:
    """Replace the rank's status file atomically, so a reader never sees half of it."""
    partial = out / f"rank{rank}.json.partial"
    partial.write_text(json.dumps(status))
    partial.replace(out / f"rank{rank}.json")


def capture_warnings(path: Path) -> None:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logging.getLogger("otel_llm").addHandler(handler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=0, help="steps before holding; 0 trains until stopped")
    parser.add_argument("--token", default="", help="ignored: a secret as jobs pass them on the command line")
    parser.add_argument("--checkpoint", type=Path, help="torch.save the model here after every step")
    parser.add_argument("--nofile", type=int, default=0, help="open-file limit of this process (0: unchanged)")
    args = parser.parse_args()
    if args.nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and args.steps == 0:
        parser.error("under torchrun pass --steps: DDP ranks must take the same number of steps")
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    capture_warnings(args.out / f"rank{rank}.log")

    torch.manual_seed(0)
    model: torch.nn.Module = GPT(vocab=VOCAB)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    session = otel_llm.instrument(model, optimizer)
    write_status(args.out, rank, {"prometheus_url": session.prometheus_url, "pid": os.getpid()})

    stop = args.out / "stop"
    generator = torch.Generator().manual_seed(rank)
    deadline = time.monotonic() + HOLD_LIMIT_S
    saves, failed_saves = 0, []
    while (args.steps == 0 or session.step < args.steps) and not stop.exists() and time.monotonic() < deadline:
        idx = torch.randint(0, VOCAB, (2, 16), generator=generator)
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if args.checkpoint is not None:
            try:
                torch.save(model.state_dict(), args.checkpoint / f"step{session.step % 2}.pt")
                saves += 1
            except (OSError, RuntimeError) as exc:  # torch wraps EMFILE in RuntimeError
                failed_saves.append(str(exc))
    session.flush()
    while not stop.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    session.shutdown()
    write_status(args.out, rank, {"prometheus_url": session.prometheus_url, "pid": os.getpid(),
                                  "steps": session.step, "saves": saves, "failed_saves": failed_saves[:20]})
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
