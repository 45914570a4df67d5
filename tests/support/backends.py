"""Run the real metrics backends (VictoriaMetrics, Prometheus, promtool) in tests.

The binaries come from ``scripts/fetch_backends.sh``; nothing here depends on
pytest except the skip in :func:`require_binary`, so the helpers can also be
used from plain scripts.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

BINARIES = ("prometheus", "promtool", "victoria-metrics")
# Where `dpkg -x` puts binaries, plus the folder root for hand-placed ones.
_SEARCH_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin", ".")
_FALSY = {"", "0", "false", "no", "off"}


def backends_dir() -> pathlib.Path:
    """The cache folder shared with scripts/fetch_backends.sh."""
    configured = os.environ.get("OTEL_LLM_BACKENDS_DIR")
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "otel_llm" / "backends"


def backend_binary(name: str) -> pathlib.Path | None:
    """Path of a fetched backend binary, or None when it was not fetched."""
    root = backends_dir()
    for sub in _SEARCH_DIRS:
        candidate = root / sub / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    return None


def in_ci() -> bool:
    """True when the CI variable is set to something truthy."""
    return os.environ.get("CI", "").strip().lower() not in _FALSY


def require_binary(name: str) -> pathlib.Path:
    """Path of a backend binary; skips locally but fails in CI when missing.

    A missing backend in CI means the setup step broke, which must not pass
    silently as a skipped test.
    """
    path = backend_binary(name)
    if path is not None:
        return path
    message = f"{name} not found under {backends_dir()}; run scripts/fetch_backends.sh"
    if in_ci():
        raise RuntimeError(message)
    import pytest

    pytest.skip(message)
    raise AssertionError("unreachable")  # pytest.skip raises


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> bytes:
    """GET a URL and return the body; raises on non-2xx answers."""
    if params:
        url = f"{url}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def http_post(url: str, body: bytes, headers: dict[str, str], timeout: float = 10.0) -> bytes:
    """POST a body and return the response body; raises on non-2xx answers."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return bytes(response.read())


def promtool_check_metrics(text: str) -> tuple[int, str]:
    """Lint a Prometheus text exposition; returns (exit code, combined output)."""
    promtool = require_binary("promtool")
    result = subprocess.run(
        [str(promtool), "check", "metrics"],
        input=text,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode, result.stdout


class _BackendProcess:
    """A backend binary on a free local port, torn down on exit.

    Output goes to a log file rather than a pipe so a chatty process can never
    block on a full pipe; the log tail is included when startup fails.
    """

    binary_name = ""
    ready_path = "/"
    startup_timeout = 30.0

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        self.extra_args = list(extra_args)
        self.port = 0
        self.workdir: pathlib.Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> pathlib.Path:
        assert self.workdir is not None, "backend not started"
        return self.workdir / "backend.log"

    def _argv(self, binary: pathlib.Path) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Hook to write config files into the work dir before starting."""

    def __enter__(self) -> _BackendProcess:
        binary = require_binary(self.binary_name)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"otel_llm_{self.binary_name}_")
        self.workdir = pathlib.Path(self._tmp.name)
        try:
            self._prepare()
            # A port picked by free_port() can be taken before the backend binds
            # it, so retry on a fresh port when the process dies early.
            for _ in range(3):
                self.port = free_port()
                if self._start(binary):
                    return self
            raise RuntimeError(f"{self.binary_name} did not start:\n{self.log_tail()}")
        except BaseException:
            self._stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _start(self, binary: pathlib.Path) -> bool:
        """Start the process; False if it exited before becoming ready."""
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._process = subprocess.Popen(
            self._argv(binary),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                http_get(self.url + self.ready_path, timeout=1.0)
                return True
            except OSError:
                time.sleep(0.05)
        self._terminate()
        raise TimeoutError(
            f"{self.binary_name} not ready after {self.startup_timeout}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the backend's output, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def _stop(self) -> None:
        self._terminate()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        """Call a Prometheus-style JSON API and return its ``data`` field."""
        payload = json.loads(http_get(self.url + path, params))
        if payload.get("status") != "success":
            raise RuntimeError(f"{path} failed: {payload}")
        return payload["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query (at a Unix time, default now); returns the ``result`` list."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return list(self._api("/api/v1/query", params)["result"])

    def metric_names(self) -> set[str]:
        """All metric names currently stored."""
        return set(self._api("/api/v1/label/__name__/values"))

    def wait_for(
        self,
        expected: Iterable[str] | Callable[[], bool],
        timeout: float = 10.0,
        interval: float = 0.1,
    ) -> bool:
        """Poll until the metric names exist (or the predicate holds)."""
        if callable(expected):
            check = expected
        else:
            names = set(expected)

            def check() -> bool:
                return names <= self.metric_names()

        deadline = time.monotonic() + timeout
        while True:
            if check():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)


class VictoriaMetrics(_BackendProcess):
    """Single-node VictoriaMetrics accepting OTLP/HTTP and answering PromQL."""

    binary_name = "victoria-metrics"
    ready_path = "/health"

    def __init__(self, extra_args: Sequence[str] = (), *, prometheus_naming: bool = True) -> None:
        super().__init__(extra_args)
        self.prometheus_naming = prometheus_naming

    def _argv(self, binary: pathlib.Path) -> list[str]:
        assert self.workdir is not None
        return [
            str(binary),
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.workdir / 'data'}",
            "-retentionPeriod=1d",
            *(["-opentelemetry.usePrometheusNaming"] if self.prometheus_naming else []),
            # Make samples visible to queries as soon as they are ingested.
            "-search.latencyOffset=0s",
            "-search.disableCache",
            *self.extra_args,
        ]

    def __enter__(self) -> VictoriaMetrics:
        super().__enter__()
        return self

    @property
    def otlp_http_endpoint(self) -> str:
        """Full OTLP/HTTP metrics URL (OTEL_EXPORTER_OTLP_METRICS_ENDPOINT)."""
        return f"{self.url}/opentelemetry/v1/metrics"

    def force_flush(self) -> None:
        """Move buffered samples into searchable parts (else visible after ~1-5 s)."""
        http_get(self.url + "/internal/force_flush")

    def push_otlp(self, body: bytes, content_encoding: str | None = None) -> None:
        """POST a serialized ExportMetricsServiceRequest."""
        headers = {"Content-Type": "application/x-protobuf"}
        if content_encoding:
            headers["Content-Encoding"] = content_encoding
        http_post(self.otlp_http_endpoint, body, headers)

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; by default evaluated one second ahead of now.

        Without an explicit time VictoriaMetrics evaluates at the current whole
        second, which hides samples stamped later within that same second.
        """
        self.force_flush()
        return super().query(promql, time.time() + 1.0 if at is None else at)

    def metric_names(self) -> set[str]:
        self.force_flush()
        return super().metric_names()


class Prometheus(_BackendProcess):
    """Prometheus server running a given prometheus.yml.

    Scrape-only: the Debian 2.53 build lacks the otlp-write-receiver feature.
    The first scrape lands about 5 s after startup, because target discovery
    updates are throttled to that interval.
    """

    binary_name = "prometheus"
    ready_path = "/-/ready"

    def __init__(self, config: str, extra_args: Sequence[str] = ()) -> None:
        super().__init__(extra_args)
        self.config = config

    def _prepare(self) -> None:
        assert self.workdir is not None
        (self.workdir / "prometheus.yml").write_text(self.config)

    def _argv(self, binary: pathlib.Path) -> list[str]:
        assert self.workdir is not None
        return [
            str(binary),
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            *self.extra_args,
        ]

    def __enter__(self) -> Prometheus:
        super().__enter__()
        return self
