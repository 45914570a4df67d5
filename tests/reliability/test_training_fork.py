"""Forked DataLoader workers never export and never hang while the parent trains and pushes OTLP.

For a minute the parent trains from a DataLoader whose two fork-started
workers are forked anew every epoch, while its OTLP reader pushes every 100 ms
to an in-test gRPC receiver (so forks land in the middle of collections). Each
worker runs the instrumented model's forward and cross-entropy and records a
KV-cache marker on the session it inherited: everything a worker could do to
make otel_llm export from it. The receiver must see only the parent.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import torch

import otel_llm
from otel_llm.pipeline.publisher import KvCacheWindow
from tests.conftest import Harness
from tests.models import GPT
from tests.support.receivers import HttpMetricsReceiver

VOCAB = 64
LENGTH = 16
DURATION = 60.0
"""Seconds of training: a few hundred worker forks."""
WORKER_TIMEOUT = 20.0
"""A worker that delivers nothing for this long is hung; the DataLoader then raises."""
EXPORT_INTERVAL_MS = 100
ITEMS_PER_EPOCH = 8

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DURATION + 60)]


class WorkerDataset(torch.utils.data.Dataset):
    """Items whose loading, in a worker, drives the inherited model and session as the parent would."""

    def __init__(self, model: GPT, parent_pid: int) -> None:
        self.model = model
        self.parent_pid = parent_pid

    def __len__(self) -> int:
        return ITEMS_PER_EPOCH

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        tokens = torch.randint(0, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(index))
        session = otel_llm.session.active()
        if os.getpid() != self.parent_pid and session is not None:
            session.record_kv_cache(3, 1)  # a marker only workers record
            self.model(tokens[None], tokens[None])  # forward hooks and the cross_entropy interceptor, in the child
        return tokens, os.getpid(), session is not None


def point_otlp_at(monkeypatch: pytest.MonkeyPatch, receiver: HttpMetricsReceiver) -> None:
    """OTLP/HTTP: gRPC's C core does not survive fork reliably (grpc/grpc#32992: fork-started DataLoader
    workers of a process with live gRPC threads segfault now and then), which is gRPC's, not otel_llm's."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_EXPERIMENTAL_RESOURCE_DETECTORS", "process")  # process.pid on every export


def test_forked_workers_never_export_and_never_hang(sessions, monkeypatch):
    with HttpMetricsReceiver() as receiver:
        point_otlp_at(monkeypatch, receiver)
        torch.manual_seed(0)
        model = GPT(vocab=VOCAB, block_size=LENGTH)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        session = otel_llm.Instrumentation(model, optimizer, config=otel_llm.Config(
            exporters="otlp", export_interval_ms=EXPORT_INTERVAL_MS, sampling="fixed", sampling_interval=2))
        sessions.append(session)
        parent = os.getpid()
        loader = torch.utils.data.DataLoader(WorkerDataset(model, parent), batch_size=2, num_workers=2,
                                             multiprocessing_context="fork", timeout=WORKER_TIMEOUT)
        worker_pids: set[int] = set()
        epochs = 0
        started = time.monotonic()
        while time.monotonic() - started < DURATION:
            for tokens, pids, saw_session in loader:
                assert bool(saw_session.all())  # every worker held the session and used it
                worker_pids.update(pids.tolist())
                _, loss = model(tokens, tokens)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            epochs += 1
        elapsed = time.monotonic() - started
        assert psutil.Process().children(recursive=True) == []  # every worker was joined

        assert session.flush(5.0)
        assert receiver.wait_for({"llm.train.steps"})
        resources = receiver.resource_attributes()
        print(f"{epochs} epochs, {len(worker_pids)} workers forked, {session.step} steps, {len(resources)} exports "
              f"from pids {sorted({r['process.pid'] for r in resources})} in {elapsed:.1f} s")
        assert elapsed < DURATION + 2 * WORKER_TIMEOUT
        assert parent not in worker_pids and len(worker_pids) >= epochs  # a fresh pair of workers every epoch
        assert {resource["process.pid"] for resource in resources} == {parent}
        assert len({resource["service.instance.id"] for resource in resources}) == 1
        assert len(resources) >= DURATION * 1000 / EXPORT_INTERVAL_MS / 4  # the parent pushed all along
        assert "llm.kv_cache.hits" not in receiver.metric_names()  # only workers recorded it
        steps = [point.value for point in receiver.points("llm.train.steps")]
        assert steps == sorted(steps) and steps[-1] == session.step == epochs * ITEMS_PER_EPOCH // 2


def exit_code_within(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None (after killing it) when it is still running at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_a_worker_forked_mid_collection_never_blocks_on_telemetry(harness, monkeypatch):
    """A fork copies every lock as it is: one the exporter thread held while collecting stays held in the
    child forever, so recording in a worker must not take any."""
    inside, release = threading.Event(), threading.Event()
    ratio = KvCacheWindow.ratio

    def slow_ratio(window: KvCacheWindow) -> float | None:
        with window._lock:  # as a collection reading the hit ratio holds it
            inside.set()
            release.wait(30)
        return ratio(window)

    monkeypatch.setattr(KvCacheWindow, "ratio", slow_ratio)
    model = GPT(vocab=VOCAB, block_size=LENGTH)
    h: Harness = harness(model, torch.optim.SGD(model.parameters(), lr=0.05), sampling="fixed", sampling_interval=1)
    collection = threading.Thread(target=h.reader.get_metrics_data)
    collection.start()
    assert inside.wait(10)
    pid = os.fork()
    if pid == 0:  # a DataLoader worker doing what WorkerDataset does
        code = 1
        try:
            h.session.record_kv_cache(3, 1)
            tokens = torch.zeros(1, LENGTH, dtype=torch.long)
            model(tokens, tokens)
            code = 0
        finally:
            os._exit(code)
    try:
        assert exit_code_within(pid, timeout=10) == 0
    finally:
        release.set()
        collection.join(10)
