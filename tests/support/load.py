"""Concurrent scrapers for load tests: every scrape's latency and every failure, measured client-side.

Each scrape opens a fresh connection, as Prometheus does after an idle scrape
interval, and reads the whole body, so the latency covers accept, collection
and transfer. Failures (no connection, timeout, HTTP error, a body the
``check`` rejects) are kept as readable lines instead of being raised, so a
test can assert that there were none and show them when there were.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Check", "LoadReport", "burst", "sustained"]

Check = Callable[[str], str | None]
"""Looks at a response body; returns what is wrong with it, or None."""


@dataclass
class LoadReport:
    """Latencies (seconds) of the scrapes that succeeded and one line per scrape that failed."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def succeeded(self, latency: float) -> None:
        with self._lock:
            self.latencies.append(latency)

    def failed(self, error: str) -> None:
        with self._lock:
            self.errors.append(error)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile ``q`` (0-100] of the latencies."""
        ordered = sorted(self.latencies)
        assert ordered, f"no scrape succeeded; errors: {self.errors[:5]}"
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    def summary(self) -> str:
        if not self.latencies:
            return f"0 scrapes, {len(self.errors)} errors: {self.errors[:5]}"
        return (f"{len(self.latencies)} scrapes, {len(self.errors)} errors, "
                f"p50 {self.percentile(50) * 1000:.1f} ms, p99 {self.percentile(99) * 1000:.1f} ms, "
                f"max {max(self.latencies) * 1000:.1f} ms; first errors: {self.errors[:5]}")


def _scrape(url: str, timeout: float, report: LoadReport, check: Check | None) -> None:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except Exception as exc:  # noqa: BLE001 - every failure is a data point
        report.failed(f"{type(exc).__name__}: {exc}")
        return
    latency = time.perf_counter() - started
    problem = check(body.decode("utf-8")) if check is not None else None
    if problem is None:
        report.succeeded(latency)
    else:
        report.failed(problem)


def _run(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def sustained(url: str, clients: int, seconds: float, timeout: float = 5.0, check: Check | None = None) -> LoadReport:
    """``clients`` scrapers, each scraping back to back for ``seconds``."""
    report = LoadReport()
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            _scrape(url, timeout, report, check)

    _run([threading.Thread(target=client, daemon=True) for _ in range(clients)])
    return report


def burst(url: str, clients: int, timeout: float = 5.0, check: Check | None = None) -> LoadReport:
    """``clients`` scrapes released at the same instant (all threads wait on one barrier first)."""
    report = LoadReport()
    start = threading.Barrier(clients)

    def client() -> None:
        start.wait()
        _scrape(url, timeout, report, check)

    _run([threading.Thread(target=client, daemon=True) for _ in range(clients)])
    return report
