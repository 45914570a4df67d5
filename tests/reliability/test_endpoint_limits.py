"""The scrape endpoint cannot take the training process's descriptors, threads or shutdown time, and says the truth.

A flood of idle connections meets a per-connection timeout and a bound on
concurrent connections while the job writes checkpoints; ``shutdown()`` keeps
its bound with the endpoint's release included; the warnings name what is
really left, the host when the host is the problem, and IPv6 URLs in brackets.
"""

from __future__ import annotations

import logging
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import psutil
import pytest

import otel_llm
from otel_llm.export.prometheus import CONNECTION_TIMEOUT, MAX_CONNECTIONS
from otel_llm.runtime.log_once import once
from tests.support.backends import free_port
from tests.support.collectors import Blackhole, otlp_env
from tests.support.jobs import WORKER, finish, job_env, launch, steps_sample, wait_for_status, wait_for_steps
from tests.support.ports import held_by_another_process
from tests.support.scrape import fetch, sample
from tests.support.training import tiny, train

pytestmark = pytest.mark.timeout(180)

FLOOD = 400
"""Idle connections opened against the endpoint: more than the job's open-file limit leaves free."""
JOB_NOFILE = 256
"""The job's ``ulimit -n``: with a thread and a descriptor per connection the flood exhausted it."""
SLACK = 0.25
"""Seconds of scheduling slack on a bound the product states (threads starting and joining on a busy machine)."""


@pytest.fixture(autouse=True)
def fresh_warnings() -> None:
    once.forget()


def start(sessions: list[otel_llm.Instrumentation], model=None, optimizer=None, **config) -> otel_llm.Instrumentation:
    config.setdefault("sampling", "fixed")
    session = otel_llm.Instrumentation(model, optimizer, config=otel_llm.Config(**config))
    sessions.append(session)
    return session


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- a flood of idle connections -------------------------------------------------------------------------------


def close_state(sock: socket.socket) -> bytes | None:
    """What the server sent before closing (b"" for a plain close), or None while it is still open."""
    sock.setblocking(False)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except BlockingIOError:
        return None
    except OSError:  # reset by the server
        return received
    return received


def wait_closed_by_server(socks: list[socket.socket], timeout: float) -> dict[socket.socket, bytes]:
    """Each socket's final bytes once the server closed it; the ones still open after ``timeout`` are left out."""
    closed: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + timeout
    while len(closed) < len(socks) and time.monotonic() < deadline:
        waiting = [s for s in socks if s not in closed]
        readable, _, _ = select.select(waiting, [], [], min(0.2, max(0.0, deadline - time.monotonic())))
        for sock in readable:
            state = close_state(sock)
            if state is not None:
                closed[sock] = state
    return closed


class Watch:
    """The largest descriptor and thread counts of a process, sampled every 50 ms until stopped."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.fds, self.threads = self._process.num_fds(), self._process.num_threads()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.fds = max(self.fds, self._process.num_fds())
                self.threads = max(self.threads, self._process.num_threads())
            except psutil.Error:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def checkpointing_job(tmp_path) -> Iterator[tuple[subprocess.Popen, str]]:
    """A job under ``ulimit -n 256`` that saves a checkpoint every step and serves Prometheus on loopback."""
    (tmp_path / "ckpt").mkdir()
    env = job_env(OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_PORT=str(free_port()))
    process = launch([sys.executable, str(WORKER), "--out", str(tmp_path), "--checkpoint", str(tmp_path / "ckpt"),
                      "--nofile", str(JOB_NOFILE)], env, tmp_path)
    try:
        url = wait_for_status(tmp_path, 0, process)["prometheus_url"]
        wait_for_steps(url, 5)
        yield process, url
    finally:
        if process.poll() is None:
            (tmp_path / "stop").touch()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.slow
def test_a_flood_of_idle_connections_leaves_a_checkpointing_job_alone_and_the_endpoint_recovers(
        tmp_path, checkpointing_job):
    process, url = checkpointing_job
    address = (urlsplit(url).hostname, urlsplit(url).port)
    watch = Watch(process.pid)
    idle_fds, idle_threads = watch.fds, watch.threads
    flood: list[socket.socket] = []
    try:
        steps_before = steps_sample(url)[1]
        failures = 0
        while len(flood) < FLOOD and failures < 5:
            try:  # 3 s: a SYN the full accept queue dropped is sent again after 1 s
                flood.append(socket.create_connection(address, timeout=3.0))
            except OSError:
                failures += 1  # an accept queue the server no longer drains
        assert len(flood) == FLOOD, f"only {len(flood)} of {FLOOD} connections were accepted"

        probe = socket.create_connection(address, timeout=1.0)  # one more, with every slot taken
        probe.settimeout(CONNECTION_TIMEOUT / 2)  # refused at accept, well before any connection times out
        try:
            assert probe.recv(64).startswith(b"HTTP/1.1 503")
        finally:
            probe.close()

        closed = wait_closed_by_server(flood, timeout=4 * CONNECTION_TIMEOUT)
        refused = sum(state.startswith(b"HTTP/1.1 503") for state in closed.values())
        assert len(closed) == FLOOD, f"{FLOOD - len(closed)} idle connections still open"
        assert refused >= FLOOD - MAX_CONNECTIONS
        watch.stop()
        print(f"flood of {FLOOD}: {refused} refused with 503; job descriptors {idle_fds} -> at most {watch.fds}, "
              f"threads {idle_threads} -> at most {watch.threads}")
        assert watch.fds <= idle_fds + MAX_CONNECTIONS + 16, (idle_fds, watch.fds)
        assert watch.threads <= idle_threads + MAX_CONNECTIONS + 8, (idle_threads, watch.threads)

        with urllib.request.urlopen(url, timeout=5) as response:  # recovered
            assert response.status == 200
        assert wait_for_steps(url, steps_before + 1)[1] > steps_before  # trained on through the flood
    finally:
        watch.stop()
        for sock in flood:
            sock.close()
    finish(process, tmp_path)
    status = wait_for_status(tmp_path, 0, process)
    assert status["failed_saves"] == [], status["failed_saves"]
    assert status["saves"] == status["steps"] > steps_before


# -- shutdown keeps its bound, the endpoint's release included ----------------------------------------------------


@pytest.mark.parametrize("timeout", [0.1, 2.0])
def test_shutdown_with_a_blackholed_final_push_and_the_endpoint_stays_within_its_bound(monkeypatch, sessions,
                                                                                      timeout):
    hole, idle = Blackhole(), None
    try:
        otlp_env(monkeypatch, "grpc", hole.port)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "30")
        model, optimizer = tiny()
        session = start(sessions, model, optimizer, exporters="prometheus,otlp", prometheus_port=0,
                        sampling_interval=1, shutdown_timeout=timeout)  # no export before the final push
        train(model, optimizer, 3)
        port = urlsplit(session.prometheus_url).port
        idle = socket.create_connection(("127.0.0.1", port))  # a scraper that connected and went quiet
        fetch(session.prometheus_url)  # accepted after the idle one: that one is now held by a handler
        started = time.monotonic()
        session.shutdown()
        elapsed = time.monotonic() - started
    finally:
        hole.close()
        if idle is not None:
            idle.close()
    print(f"shutdown_timeout {timeout} s: shutdown took {elapsed:.3f} s")
    assert elapsed <= timeout + SLACK, f"shutdown took {elapsed:.2f} s with shutdown_timeout={timeout}"
    with socket.socket() as sock:  # the endpoint is released: nothing listens on its port any more
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


# -- messages that say what is true ------------------------------------------------------------------------------


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process listens on (one of ours would be shared, not a clash)."""
    with held_by_another_process(next_free=False) as port:
        yield port


def test_a_taken_port_with_prometheus_the_only_reader_says_nothing_is_exported(sessions, caplog, held_port):
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        session = start(sessions, exporters="prometheus", prometheus_port=held_port)
    assert session.prometheus_url is None
    (line,) = warnings(caplog)
    assert f"127.0.0.1:{held_port}" in line and "port" in line and "OTEL_EXPORTER_PROMETHEUS_PORT" in line
    assert "OTLP" not in line and "exports no metrics" in line


def test_a_taken_port_with_otlp_as_well_says_otlp_is_left(sessions, caplog, held_port, monkeypatch):
    otlp_env(monkeypatch, "grpc", free_port())
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        session = start(sessions, exporters="prometheus,otlp", prometheus_port=held_port)
    assert session.prometheus_url is None and session._bundle.otlp_reader is not None
    (line,) = warnings(caplog)
    assert "exporting through OTLP only" in line


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_is_served_and_its_url_has_brackets(sessions, host):
    port = free_port()
    model, optimizer = tiny()
    session = start(sessions, model, optimizer, exporters="prometheus", prometheus_host=host, prometheus_port=port,
                    sampling_interval=1)
    assert session.prometheus_url == f"http://[::1]:{port}/metrics"
    train(model, optimizer, 2)
    assert sample(fetch(session.prometheus_url)[1], "llm_train_steps_total") == 2


def test_a_host_that_does_not_resolve_is_named_as_the_host_and_loopback_serves_instead(sessions, caplog):
    port = free_port()
    model, optimizer = tiny()
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        session = start(sessions, model, optimizer, exporters="prometheus", prometheus_host="no.such.host.invalid",
                        prometheus_port=port, sampling_interval=1)
    assert session.prometheus_url == f"http://127.0.0.1:{port}/metrics"
    lines = warnings(caplog)
    assert len(lines) == 2, lines
    assert "host 'no.such.host.invalid'" in lines[0] and "OTEL_EXPORTER_PROMETHEUS_HOST" in lines[0]
    assert "port" not in lines[0].replace("OTEL_EXPORTER_PROMETHEUS", "")
    assert session.prometheus_url in lines[1]
    train(model, optimizer, 2)
    assert sample(fetch(session.prometheus_url)[1], "llm_train_steps_total") == 2
