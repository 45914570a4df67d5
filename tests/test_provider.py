"""The export path: the Prometheus endpoint, Views, port clashes, bounded shutdown, fork safety, OTLP.

Everything runs on loopback against in-test servers; each test trains a tiny
nanoGPT-style model a few steps and always shuts its sessions down (a session
with a Prometheus reader stays registered on prometheus_client's global
REGISTRY until then).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import torch

import otel_llm
from otel_llm.catalog import LOSS_TOKEN_BUCKETS, STEP_DURATION_BUCKETS
from tests.models import GPT
from tests.support.backends import free_port
from tests.support.collectors import otlp_env
from tests.support.ports import held_by_another_process
from tests.support.receivers import GrpcMetricsReceiver, HttpMetricsReceiver
from tests.support.scrape import fetch, sample, series

pytestmark = pytest.mark.timeout(90)

VOCAB = 64
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
_ENV_PREFIXES = ("OTEL_",)
_ENV_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


# -- fixtures and helpers ---------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* / torchrun variable of the outer environment leaks into a test."""
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES:
            monkeypatch.delenv(name)


def start(sessions: list[otel_llm.Instrumentation], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          **config: Any) -> otel_llm.Instrumentation:
    config.setdefault("sampling_interval", 1)
    session = otel_llm.Instrumentation(model, optimizer, config=otel_llm.Config(**config))
    sessions.append(session)
    return session


def tiny() -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def train(model: GPT, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> float:
    """Train ``steps`` steps; return the global gradient norm of the last step (before its update)."""
    g = torch.Generator().manual_seed(seed)
    norm = math.nan
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (2, 16), generator=g)
        _, loss = model(idx, idx)
        loss.backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
        optimizer.step()
        optimizer.zero_grad()
    return norm


def can_bind(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now (SO_REUSEADDR, as every server sets, so the
    TIME_WAIT of earlier scrape connections does not count as in use)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            return False
        return True


def non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


# -- the Prometheus endpoint --------------------------------------------------------


def test_scrape_shows_trained_steps_and_signals_in_classic_text_by_default(sessions):
    model, optimizer = tiny()
    session = start(sessions, model, optimizer, exporters="prometheus", prometheus_port=0)
    url = session.prometheus_url
    assert url is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)
    assert int(url.rsplit(":", 1)[1].split("/")[0]) != 0
    norm = train(model, optimizer, 4)
    assert session.flush(5.0)

    content_type, body = fetch(url)
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    assert not body.rstrip().endswith("# EOF")
    assert "# TYPE llm_train_steps_total counter" in body
    assert sample(body, "llm_train_steps_total") == 4
    assert sample(body, "llm_telemetry_sampled_steps_total") == 4
    assert sample(body, "llm_train_tokens_total") == 4 * 2 * 16
    assert sample(body, "llm_grad_norm") == pytest.approx(norm, rel=1e-4)
    assert sample(body, "llm_train_learning_rate", llm_param_group="0") == pytest.approx(0.05)
    assert sample(body, "llm_loss_token_count") == 4 * 2 * 16
    assert sample(body, "llm_train_step_duration_seconds_count") == 3
    llm_lines = [(name, labels) for name, labels, _ in series(body) if name.startswith("llm_")]
    assert len(llm_lines) > 20
    for name, labels in llm_lines:
        assert labels.get("llm_rank") == "0", name
        assert labels.get("llm_world_size") == "1", name


def test_openmetrics_is_served_when_the_scraper_asks_for_it(sessions):
    model, optimizer = tiny()
    session = start(sessions, model, optimizer, exporters="prometheus", prometheus_port=0)
    train(model, optimizer, 2)
    assert session.flush(5.0)
    content_type, body = fetch(session.prometheus_url, accept=OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    assert "version=1.0.0" in content_type
    assert body.endswith("# EOF\n")
    assert body.count("# EOF") == 1
    # OpenMetrics names the counter family without _total and the sample with it
    assert "# TYPE llm_train_steps counter" in body
    assert sample(body, "llm_train_steps_total") == 2


def test_endpoint_binds_loopback_only_by_default(sessions):
    model, optimizer = tiny()
    session = start(sessions, model, optimizer, exporters="prometheus", prometheus_port=0)
    assert session.config.prometheus_host == "127.0.0.1"
    port = int(session.prometheus_url.rsplit(":", 1)[1].split("/")[0])
    listeners = [c for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    assert [c.laddr.ip for c in listeners] == ["127.0.0.1"]
    address = non_loopback_ipv4()
    if address is not None:
        with socket.socket() as s:
            s.settimeout(2)
            with pytest.raises(OSError):
                s.connect((address, port))
    fetch(session.prometheus_url)  # while loopback answers


def test_two_scrapes_in_a_row_have_no_duplicate_series(sessions):
    model, optimizer = tiny()
    session = start(sessions, model, optimizer, exporters="prometheus", prometheus_port=0)
    train(model, optimizer, 3)
    assert session.flush(5.0)
    for accept in (None, None, OPENMETRICS, OPENMETRICS):
        _, body = fetch(session.prometheus_url, accept=accept)
        keys = [line.rsplit(" ", 1)[0] for line in body.splitlines() if line and not line.startswith("#")]
        duplicates = {k for k in keys if keys.count(k) > 1}
        assert not duplicates
        types = [line.split()[2] for line in body.splitlines() if line.startswith("# TYPE ")]
        assert len(types) == len(set(types))
        assert sample(body, "llm_train_steps_total") == 3


# -- Views ---------------------------------------------------------------------------


def _le(body: str, name: str) -> list[float]:
    return [float(labels["le"]) for n, labels, _ in series(body) if n == name]


def test_histogram_buckets_are_the_catalog_ones(sessions):
    model, optimizer = tiny()
    session = start(sessions, model, optimizer, exporters="prometheus", prometheus_port=0)
    train(model, optimizer, 3)
    assert session.flush(5.0)
    _, body = fetch(session.prometheus_url)
    assert _le(body, "llm_loss_token_bucket") == [*LOSS_TOKEN_BUCKETS, math.inf]
    assert _le(body, "llm_train_step_duration_seconds_bucket") == [*STEP_DURATION_BUCKETS, math.inf]
    assert sample(body, "llm_loss_token_bucket", le="+Inf") == 3 * 2 * 16


def test_disabled_signals_are_absent_from_the_scrape(sessions):
    model, optimizer = tiny()
    session = start(sessions, model, optimizer, exporters="prometheus", prometheus_port=0,
                    disabled_signals="llm.loss.token,llm.grad.*")
    train(model, optimizer, 3)
    assert session.flush(5.0)
    _, body = fetch(session.prometheus_url)
    names = {name for name, _, _ in series(body)}
    assert not {n for n in names if n.startswith(("llm_loss_token_bucket", "llm_loss_token_count",
                                                  "llm_loss_token_sum", "llm_grad_"))}
    assert "llm_loss_token" not in body.replace("llm_loss_token_skewness", "")
    assert "llm_grad_" not in body
    assert sample(body, "llm_train_steps_total") == 3
    assert "llm_train_loss" in names
    assert "llm_loss_token_skewness" in names
    assert "llm_param_update_ratio" in names


# -- a port held by another process --------------------------------------------------


@pytest.fixture
def foreign_listener() -> Iterator[int]:
    """A port held by a separate Python process listening on 127.0.0.1."""
    with held_by_another_process(next_free=False) as port:
        yield port


def test_port_held_by_another_process_degrades_to_otlp_with_one_warning(sessions, foreign_listener, monkeypatch,
                                                                         caplog):
    caplog.set_level(logging.WARNING, logger="otel_llm")
    with GrpcMetricsReceiver() as receiver:
        otlp_env(monkeypatch, "grpc", receiver.port)
        model, optimizer = tiny()
        session = start(sessions, model, optimizer, exporters="prometheus,otlp", prometheus_port=foreign_listener)
        assert session.prometheus_url is None
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and str(foreign_listener) in r.getMessage()]
        assert len(warnings) == 1, caplog.text
        assert "OTEL_EXPORTER_PROMETHEUS_PORT" in warnings[0]
        train(model, optimizer, 3)
        assert session.flush(5.0)
        assert receiver.wait_for({"llm.train.steps", "llm.grad.norm"}, timeout=5)
        assert receiver.points("llm.train.steps")[-1].value == 3
    assert not can_bind(foreign_listener)  # still the other process's


def test_a_second_session_on_the_same_port_exports_otlp_only_and_the_port_is_freed(sessions, caplog):
    port = free_port()
    model_a, optimizer_a = tiny()
    model_b, optimizer_b = tiny()
    a = start(sessions, model_a, optimizer_a, exporters="prometheus", prometheus_port=port)
    caplog.set_level(logging.WARNING, logger="otel_llm")
    b = start(sessions, model_b, optimizer_b, exporters="prometheus", prometheus_port=port)
    url = f"http://127.0.0.1:{port}/metrics"
    assert a.prometheus_url == url
    assert b.prometheus_url is None  # two readers on one registry would emit every family twice
    assert any(str(port) in r.getMessage() and "another otel_llm session" in r.getMessage()
               for r in caplog.records)
    train(model_a, optimizer_a, 2)
    train(model_b, optimizer_b, 3)
    assert a.flush(5.0) and b.flush(5.0)
    _, body = fetch(url)
    assert sample(body, "llm_train_steps_total") == 2
    types = [line.split()[2] for line in body.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))

    b.shutdown()
    assert sample(fetch(url)[1], "llm_train_steps_total") == 2  # a still serves
    a.shutdown()
    with pytest.raises(urllib.error.URLError):
        fetch(url)
    assert can_bind(port)
    # and a new session serves on it again
    model_c, optimizer_c = tiny()
    c = start(sessions, model_c, optimizer_c, exporters="prometheus", prometheus_port=port)
    assert c.prometheus_url == url
    train(model_c, optimizer_c, 1)
    assert c.flush(5.0)
    assert sample(fetch(url)[1], "llm_train_steps_total") == 1


# -- a collector that is not there ---------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_unreachable_collector_does_not_disturb_training(sessions, monkeypatch, protocol):
    otlp_env(monkeypatch, protocol, free_port())
    model, optimizer = tiny()
    session = start(sessions, model, optimizer, exporters="otlp", shutdown_timeout=1.0, export_interval_ms=100)
    train(model, optimizer, 4)
    assert session.step == 4
    started = time.monotonic()
    flushed = session.flush()
    assert time.monotonic() - started < 1.0 + 0.5
    assert flushed is False  # nothing arrived, and flush says so
    started = time.monotonic()
    session.shutdown()
    assert time.monotonic() - started < 1.0 + 0.5


# -- fork ---------------------------------------------------------------------------


def _instance_ids(receiver: GrpcMetricsReceiver) -> set[str]:
    return {attrs.get("service.instance.id") for attrs in receiver.resource_attributes()}


@pytest.fixture
def forked_setup(sessions, monkeypatch):
    with GrpcMetricsReceiver() as receiver:
        otlp_env(monkeypatch, "grpc", receiver.port)
        model, optimizer = tiny()
        session = start(sessions, model, optimizer, exporters="otlp", export_interval_ms=200)
        train(model, optimizer, 2)
        assert session.flush(5.0)
        assert receiver.wait_for({"llm.train.steps"}, timeout=5)
        (parent_id,) = _instance_ids(receiver)
        assert parent_id
        yield receiver, session, model, optimizer, parent_id


def _assert_only_parent_exported(receiver: GrpcMetricsReceiver, session, model, optimizer, parent_id: str,
                                 steps_before: int) -> None:
    train(model, optimizer, 2, seed=5)
    assert session.flush(5.0)
    time.sleep(0.5)  # several export intervals: a straggling child export would have arrived
    assert _instance_ids(receiver) == {parent_id}
    assert "llm.kv_cache.hits" not in receiver.metric_names()  # only the children recorded it
    assert receiver.points("llm.train.steps")[-1].value == steps_before + 2


def test_forked_child_exports_nothing(forked_setup):
    receiver, session, model, optimizer, parent_id = forked_setup
    pid = os.fork()
    if pid == 0:  # child: record a marker the parent never records, live through ~7 export intervals
        code = 0
        try:
            session.record_kv_cache(5, 1)
            time.sleep(1.5)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    train(model, optimizer, 2, seed=3)  # the parent keeps training meanwhile
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    _assert_only_parent_exported(receiver, session, model, optimizer, parent_id, steps_before=4)


# -- OTLP/HTTP through the explicit API ----------------------------------------------


@pytest.mark.parametrize("service_name", [None, "pretrain-7b"])
def test_otlp_http_export_carries_values_and_resource(sessions, monkeypatch, service_name):
    if service_name is not None:
        monkeypatch.setenv("OTEL_SERVICE_NAME", service_name)
    with HttpMetricsReceiver() as receiver:
        otlp_env(monkeypatch, "http/protobuf", receiver.port)
        model, optimizer = tiny()
        session = otel_llm.instrument(model, optimizer, config=otel_llm.Config(exporters="otlp", sampling_interval=1))
        sessions.append(session)
        assert session.prometheus_url is None
        norm = train(model, optimizer, 5)
        assert session.flush(5.0)
        assert receiver.wait_for({"llm.train.steps", "llm.grad.norm"}, timeout=5)
        assert receiver.points("llm.train.steps")[-1].value == 5
        assert receiver.points("llm.grad.norm")[-1].value == pytest.approx(norm, rel=1e-4)
        assert receiver.headers[-1]["content-type"] == "application/x-protobuf"
        resources = receiver.resource_attributes()
        assert resources
        for resource in resources:
            assert resource["llm.rank"] == 0
            assert resource["llm.world_size"] == 1
            assert resource["service.name"] == (service_name or "otel-llm-training")
