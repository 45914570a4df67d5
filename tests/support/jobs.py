"""A training job in a process of its own (``tests/reliability/endpoint_worker.py``): start, watch, stop.

The job writes ``<out>/rank<k>.json`` (scrape URL, pid; at exit its steps and
checkpoint saves), ``<out>/rank<k>.log`` (otel_llm's warnings) and
``<out>/output.log`` (everything it printed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.scrape import series

__all__ = ["BIN", "WORKER", "finish", "job_env", "launch", "output_tail", "steps_sample", "wait_for_status",
           "wait_for_steps", "warnings_logged"]

BIN = Path(sys.executable).parent
WORKER = Path(__file__).resolve().parents[1] / "reliability" / "endpoint_worker.py"


def job_env(**extra: str) -> dict[str, str]:
    """This environment without OTEL_* / torchrun variables, with one torch thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OTEL_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def launch(argv: list[str], env: dict[str, str], out: Path) -> subprocess.Popen:
    """Start a job with its output in ``out/output.log`` (a file: a full pipe would stall the job)."""
    with open(out / "output.log", "wb") as log:
        return subprocess.Popen(argv, env=env, cwd=out, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)


def output_tail(out: Path) -> str:
    return (out / "output.log").read_text(errors="replace")[-4000:]


def wait_for_status(out: Path, rank: int, process: subprocess.Popen, timeout: float = 90) -> dict:
    path = out / f"rank{rank}.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the job exited with {process.returncode}:\n{output_tail(out)}"
        assert time.monotonic() < deadline, f"rank {rank} never started:\n{output_tail(out)}"
        time.sleep(0.05)
    return json.loads(path.read_text())


def finish(process: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    (out / "stop").touch()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise AssertionError(f"the job did not stop:\n{output_tail(out)}") from None
    assert process.returncode == 0, output_tail(out)


def steps_sample(url: str) -> tuple[dict[str, str], float] | None:
    """Labels and value of the step counter in one scrape; None before the first step."""
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    found = [(labels, value) for name, labels, value in series(body) if name == "llm_train_steps_total"]
    assert len(found) <= 1, found
    return found[0] if found else None


def wait_for_steps(url: str, steps: int, timeout: float = 90) -> tuple[dict[str, str], float]:
    deadline = time.monotonic() + timeout
    while True:
        found = steps_sample(url)
        if found is not None and found[1] >= steps:
            return found
        assert time.monotonic() < deadline, f"{url}: {found} after {timeout} s, waiting for {steps} steps"
        time.sleep(0.2)


def warnings_logged(out: Path, rank: int) -> list[str]:
    return [line for line in (out / f"rank{rank}.log").read_text().splitlines() if line.startswith("WARNING")]
