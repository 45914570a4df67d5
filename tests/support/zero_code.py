"""An unmodified training script under ``opentelemetry-instrument``, and scraping its endpoint.

Shared by the zero-code end-to-end tests. The script holds after training
(``TRAIN_HOLD_FILE``) so its live endpoint can be scraped; dropping the hold
file lets it exit.
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from tests.support.backends import free_port

__all__ = ["EXIT_TIMEOUT", "INSTRUMENT", "SAMPLING_INTERVAL", "SCRIPTS", "STARTUP_TIMEOUT", "TRAIN_STEPS", "VENV_BIN",
           "Scrape", "TrainProcess", "clean_env", "scrape", "scrape_until"]

VENV_BIN = pathlib.Path(sys.executable).parent
INSTRUMENT = VENV_BIN / "opentelemetry-instrument"
SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
TRAIN_STEPS = 20
SAMPLING_INTERVAL = 2
STARTUP_TIMEOUT = 60.0  # process start, imports and training, until "trained N steps"
EXIT_TIMEOUT = 15.0  # from dropping the hold file to the process exit


# --- the subprocess ----------------------------------------------------------------------------


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<none>"


def clean_env() -> dict[str, str]:
    """The test's environment without any OTEL_* setting or PYTHONPATH of its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "PYTHONPATH"}


class TrainProcess:
    """One instrumented training script; stdout/stderr go to files so pipes never block it."""

    def __init__(self, script: str, workdir: pathlib.Path, env: dict[str, str]) -> None:
        """``script``: a file in tests/scripts; ``env`` adds to (and overrides) the defaults below."""
        self.script = script
        self.workdir = workdir
        self.hold_file = workdir / "release"
        self.stdout_path = workdir / "stdout.txt"
        self.stderr_path = workdir / "stderr.txt"
        self.prometheus_port = free_port()
        self.env = {
            **clean_env(),
            "OTEL_METRICS_EXPORTER": "prometheus,otlp",
            "OTEL_EXPORTER_PROMETHEUS_PORT": str(self.prometheus_port),
            "OTEL_LLM_SAMPLING": "fixed",
            "OTEL_LLM_SAMPLING_INTERVAL": str(SAMPLING_INTERVAL),
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TRAIN_STEPS": str(TRAIN_STEPS),
            "TRAIN_HOLD_FILE": str(self.hold_file),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.trained_after = math.nan  # seconds from start to "trained N steps"
        self.exit_after = math.nan  # seconds from dropping the hold file to exit

    @property
    def scrape_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}/metrics"

    def report(self) -> str:
        """Exit status and output tails, for failure messages."""
        code = self.process.poll() if self.process is not None else None
        return (f"\n--- {self.script}: exit code {code}\n--- stdout tail:\n{_tail(self.stdout_path, 10)}"
                f"\n--- stderr tail:\n{_tail(self.stderr_path)}")

    def start(self) -> None:
        # cwd is the run's own folder, not the repo root: opentelemetry-instrument puts the
        # cwd on PYTHONPATH, and a stale otel_llm.egg-info there would reorder entry points.
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [str(INSTRUMENT), str(VENV_BIN / "python"), str(SCRIPTS / self.script)],
                cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.started = time.monotonic()

    def wait_trained(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Block until the script printed that training finished (it then holds)."""
        assert self.process is not None
        marker = f"trained {TRAIN_STEPS} steps"
        deadline = time.monotonic() + timeout
        while marker not in self.stdout_path.read_text(errors="replace"):
            if self.process.poll() is not None:
                pytest.fail(f"{self.script} exited before finishing training{self.report()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.script} did not finish training within {timeout:.0f} s{self.report()}")
            time.sleep(0.1)
        self.trained_after = time.monotonic() - self.started

    def release_and_wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Drop the hold file and wait for the exit; returns the exit code."""
        assert self.process is not None
        self.hold_file.touch()
        released = time.monotonic()
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.script} did not exit within {timeout:.0f} s of its release{self.report()}")
        self.exit_after = time.monotonic() - released
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


# --- scraping ----------------------------------------------------------------------------------


@dataclass
class Scrape:
    text: str = field(repr=False)
    content_type: str
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict, repr=False)


def scrape(url: str, accept: str | None = None) -> Scrape:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read().decode()
        content_type = response.headers.get("Content-Type", "")
    result = Scrape(body, content_type)
    if accept is None:
        for family in parse_prometheus(body):
            for sample in family.samples:
                result.samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return result


def scrape_until(process: TrainProcess, done: Callable[[Scrape], bool], timeout: float) -> Scrape:
    """Scrape repeatedly until ``done`` holds or ``timeout`` passes; returns the last scrape."""
    deadline = time.monotonic() + timeout
    last: Scrape | None = None
    error: Exception | None = None
    while True:
        try:
            last = scrape(process.scrape_url)
            if done(last):
                return last
        except OSError as exc:
            error = exc
        if time.monotonic() > deadline:
            if last is None:
                pytest.fail(f"no scrape answered at {process.scrape_url}: {error}{process.report()}")
            return last
        if process.process is not None and process.process.poll() is not None:
            pytest.fail(f"{process.script} exited while being scraped{process.report()}")
        time.sleep(0.2)
