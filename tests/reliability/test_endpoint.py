"""The Prometheus endpoint as operators meet it: under scrape load, conformant, after many flushes,
beside a port another process holds, closed to the network, and bounded in cardinality.

Every test scrapes the real endpoint over 127.0.0.1 while a tiny GPT trains, either in a background
thread of this process or in a training process started here (``endpoint_worker.py``, alone or under
torchrun) that holds the endpoint as a real job does. The numbers asserted are the ones an operator
would notice: scrape latency, errors, duplicate series, warnings in the job's log.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_classic

import otel_llm
from otel_llm.export.views import OVERFLOW_ATTRIBUTE
from tests.models import GPT
from tests.support.backends import free_port, promtool_check_metrics, require_binary
from tests.support.jobs import (
    BIN,
    WORKER,
    finish,
    job_env,
    launch,
    output_tail,
    wait_for_status,
    wait_for_steps,
    warnings_logged,
)
from tests.support.load import burst, sustained
from tests.support.ports import held_by_another_process
from tests.support.receivers import GrpcMetricsReceiver, attributes_dict, metric_points
from tests.support.scrape import fetch, sample, series

pytestmark = pytest.mark.timeout(180)

VOCAB = 64
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
PROBE_METRIC = "llm.custom.probe"
PROBE_LABEL = "llm.custom.value"
PROBE_SERIES, PROBE_LABEL_NAME = "llm_custom_probe", "llm_custom_value"
SDK_CARDINALITY_LIMIT = 2000
SECRET = f"otel-llm-secret-{uuid.uuid4().hex}"
"""Passed on the training process's command line, where jobs pass tokens."""


# -- training ------------------------------------------------------------------------------------------


def new_model() -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    idx = torch.randint(0, VOCAB, (2, 16), generator=generator)
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


class BackgroundTraining:
    """Trains in a daemon thread for ``steps`` steps, or until :meth:`stop`; the thread's error is re-raised.

    ``after_step(step)`` runs in the training thread after each step, where a training loop would call
    ``otel_llm.record``.
    """

    def __init__(self, model: GPT, optimizer: torch.optim.Optimizer, steps: int | None = None,
                 after_step: Callable[[int], None] | None = None) -> None:
        self.model, self.optimizer, self.steps, self.after_step = model, optimizer, steps, after_step
        self.done = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training", daemon=True)

    def __enter__(self) -> BackgroundTraining:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        generator = torch.Generator().manual_seed(0)
        try:
            while not self._stop.is_set() and (self.steps is None or self.done < self.steps):
                train_step(self.model, self.optimizer, generator)
                self.done += 1
                if self.after_step is not None:
                    self.after_step(self.done)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def wait_for(self, steps: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.done < steps and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._raise()
        assert self.done >= steps, f"{self.done} of {steps} steps after {timeout} s"

    def finish(self, timeout: float = 60) -> int:
        """Wait for the thread to end by itself; the steps it took."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "training did not finish"
        self._raise()
        return self.done

    def stop(self) -> int:
        self._stop.set()
        return self.finish()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def start_session(sessions: list[otel_llm.Instrumentation], model: GPT, optimizer: torch.optim.Optimizer,
                  extra_readers: tuple = (), **config: object) -> otel_llm.Instrumentation:
    config.setdefault("prometheus_port", 0)
    session = otel_llm.Instrumentation(model, optimizer, config=otel_llm.Config(**config),
                                       extra_readers=extra_readers)
    sessions.append(session)
    return session


@pytest.fixture
def schema(tmp_path: Path) -> str:
    """A schema file declaring the probe metric: a gauge with one attribute."""
    path = tmp_path / "metrics.yaml"
    path.write_text(f"metrics:\n  - name: {PROBE_METRIC}\n    instrument: gauge\n"
                    f"    description: One series per recorded label value.\n    attributes: [{PROBE_LABEL}]\n")
    return str(path)


# -- reading expositions ---------------------------------------------------------------------------------


def lines(body: str) -> list[str]:
    """The lines of an exposition: only \\n ends one (str.splitlines() also splits inside label values)."""
    return body.split("\n")


def duplicate_series(body: str) -> list[str]:
    """Sample lines (name and labels) that occur more than once."""
    keys = Counter(line.rsplit(" ", 1)[0] for line in lines(body) if line and not line.startswith("#"))
    return sorted(key for key, count in keys.items() if count > 1)


def repeated_families(body: str) -> list[str]:
    names = Counter(line.split()[2] for line in lines(body) if line.startswith("# TYPE "))
    return sorted(name for name, count in names.items() if count > 1)


def well_formed_training_scrape(body: str) -> str | None:
    """What is wrong with a scrape of a training process: no step counter, or a series twice."""
    steps = [line for line in lines(body) if line.startswith("llm_train_steps_total")]
    if len(steps) != 1:
        return f"{len(steps)} llm_train_steps_total samples"
    duplicates = duplicate_series(body)
    return f"duplicate series: {duplicates[:3]}" if duplicates else None


def parsed_duplicates(families: list) -> list[str]:
    """Samples (name and labels) that a parser returned more than once."""
    keys = Counter((s.name, tuple(sorted(s.labels.items()))) for family in families for s in family.samples)
    return sorted(repr(key) for key, count in keys.items() if count > 1)


def probe_values(families: list) -> dict[str, float]:
    """Label value -> sample value of every probe-metric sample."""
    return {s.labels[PROBE_LABEL_NAME]: s.value for family in families for s in family.samples
            if s.name == PROBE_SERIES}


_AWKWARD = '"\\\n\r\t{}=,# \'\x00\x0b\x0c\x1c\x85\u2028\u2029'
"""What the text formats escape, or what str.splitlines() would split on."""


def fuzzed_label_values(count: int, seed: int) -> set[str]:
    """``count`` distinct strings of 1-16 random code points: three in ten from :data:`_AWKWARD`, two in ten
    emoji, the rest anywhere in Unicode but the surrogates (which UTF-8 cannot encode). Never empty: in both
    formats an empty label value means the label is absent."""
    rng = random.Random(seed)

    def char() -> str:
        pick = rng.random()
        if pick < 0.3:
            return rng.choice(_AWKWARD)
        if pick < 0.5:
            return chr(rng.randint(0x1F300, 0x1FAFF))
        code = rng.randint(0, 0x10FFFF - 0x800)
        return chr(code + 0x800 if code >= 0xD800 else code)

    values: set[str] = set()
    while len(values) < count:
        values.add("".join(char() for _ in range(rng.randint(1, 16))))
    return values


# -- conformance, flushes and cardinality (training in a thread) -------------------------------------------


def test_both_formats_parse_pass_promtool_and_carry_1000_fuzzed_label_values_exactly(sessions, schema):
    require_binary("promtool")
    model, optimizer = new_model()
    session = start_session(sessions, model, optimizer, exporters="prometheus", schema_path=schema,
                            sampling_interval=1)
    values = fuzzed_label_values(1000, seed=6)
    recorded = {value: float(index) for index, value in enumerate(sorted(values))}
    with BackgroundTraining(model, optimizer) as training:
        training.wait_for(3)
        for value, number in recorded.items():
            otel_llm.record(PROBE_METRIC, number, {PROBE_LABEL: value})
        assert session.flush(5.0)
        classic_type, classic = fetch(session.prometheus_url)
        openmetrics_type, openmetrics = fetch(session.prometheus_url, accept=OPENMETRICS)

    assert "version=0.0.4" in classic_type and openmetrics_type.startswith("application/openmetrics-text")
    for body, parse in ((classic, parse_classic), (openmetrics, parse_openmetrics)):
        families = list(parse(body))
        names = Counter(family.name for family in families)
        assert [name for name, count in names.items() if count > 1] == []
        assert repeated_families(body) == []
        assert parsed_duplicates(families) == []
        assert probe_values(families) == recorded
        assert {s.name for family in families for s in family.samples} >= {"llm_train_steps_total", "llm_grad_norm"}
    code, output = promtool_check_metrics(classic)
    assert (code, output) == (0, "")


def test_100_flushes_then_one_scrape_has_every_series_once_in_under_200_ms(sessions, monkeypatch):
    with GrpcMetricsReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_INSECURE", "true")
        model, optimizer = new_model()
        session = start_session(sessions, model, optimizer, exporters="prometheus,otlp", sampling_interval=1)
        with BackgroundTraining(model, optimizer) as training:
            training.wait_for(3)
            assert session.flush(5.0)
            _, before = fetch(session.prometheus_url)
            pushes_before = len(receiver.requests)
            flushed = [session.flush(5.0) for _ in range(100)]
            started = time.perf_counter()
            _, after = fetch(session.prometheus_url)
            scrape_seconds = time.perf_counter() - started
        pushes = len(receiver.requests) - pushes_before
        session.shutdown()  # while the receiver still answers its last push

    assert all(flushed)
    assert pushes >= 100  # every flush pushed OTLP: the flushes were real
    assert duplicate_series(after) == []
    assert repeated_families(after) == []
    assert {name for name, _, _ in series(after)} == {name for name, _, _ in series(before)}
    assert sample(after, "llm_train_steps_total") >= sample(before, "llm_train_steps_total") >= 3
    print(f"scrape after 100 flushes: {scrape_seconds * 1000:.1f} ms")
    assert scrape_seconds < 0.2, f"{scrape_seconds * 1000:.0f} ms"


def test_2500_label_values_log_one_overflow_warning_export_the_overflow_series_and_leave_training_alone(
        sessions, schema, caplog):
    steps, per_step = 25, 100  # 2500 distinct values, recorded from the training loop
    reference, reference_optimizer = new_model()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        train_step(reference, reference_optimizer, generator)

    caplog.set_level(logging.WARNING, logger="otel_llm")
    model, optimizer = new_model()
    memory = InMemoryMetricReader()  # a second reader: it overflows too, and the warning is still one
    session = start_session(sessions, model, optimizer, exporters="prometheus", schema_path=schema,
                            extra_readers=(memory,))

    def record_values(step: int) -> None:
        for index in range((step - 1) * per_step, step * per_step):
            otel_llm.record(PROBE_METRIC, float(index), {PROBE_LABEL: f"value-{index}"})

    with BackgroundTraining(model, optimizer, steps=steps, after_step=record_values) as training:
        assert training.finish() == steps
    assert session.step == steps
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))

    overflow_warnings = [r.getMessage() for r in caplog.records
                         if r.levelno >= logging.WARNING and PROBE_METRIC in r.getMessage()]
    assert len(overflow_warnings) == 1, overflow_warnings
    assert OVERFLOW_ATTRIBUTE in overflow_warnings[0]

    _, body = fetch(session.prometheus_url)
    probes = [labels for name, labels, _ in series(body) if name == PROBE_SERIES]
    overflow = [labels for labels in probes if labels.get("otel_metric_overflow") == "true"]
    assert len(overflow) == 1
    assert len(probes) == SDK_CARDINALITY_LIMIT + 1
    assert len({labels[PROBE_LABEL_NAME] for labels in probes if labels not in overflow}) == SDK_CARDINALITY_LIMIT
    assert sample(body, PROBE_SERIES, otel_metric_overflow="true") == steps * per_step - 1  # the last value
    memory_points = [p for rm in memory.get_metrics_data().resource_metrics for sm in rm.scope_metrics
                     for m in sm.metrics if m.name == PROBE_METRIC for p in m.data.data_points]
    assert sum(dict(p.attributes) == {OVERFLOW_ATTRIBUTE: True} for p in memory_points) == 1


# -- a training process of its own ------------------------------------------------------------------------


def otlp_env(receiver: GrpcMetricsReceiver, interval_ms: int) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.url, "OTEL_EXPORTER_OTLP_METRICS_INSECURE": "true",
            "OTEL_METRIC_EXPORT_INTERVAL": str(interval_ms)}


def steps_pushed_by_rank(receiver: GrpcMetricsReceiver) -> dict[int, float]:
    """The latest ``llm.train.steps`` value each rank pushed over OTLP, by the rank on its resource."""
    latest: dict[int, float] = {}
    for request in receiver.requests:
        for resource_metrics in request.resource_metrics:
            rank = attributes_dict(resource_metrics.resource.attributes)["llm.rank"]
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == "llm.train.steps":
                        latest[rank] = metric_points(metric)[-1].value
    return latest


@dataclass
class Job:
    process: subprocess.Popen
    url: str
    receiver: GrpcMetricsReceiver


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Job]:
    """One process training until the module is done: Prometheus and OTLP on, the process resource detector
    and OTEL_RESOURCE_ATTRIBUTES set, and a secret on its command line."""
    out = tmp_path_factory.mktemp("job")
    with GrpcMetricsReceiver() as receiver:
        env = job_env(OTEL_METRICS_EXPORTER="prometheus,otlp", OTEL_EXPORTER_PROMETHEUS_PORT=str(free_port()),
                      OTEL_EXPERIMENTAL_RESOURCE_DETECTORS="process",
                      OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=reliability",
                      **otlp_env(receiver, interval_ms=1000))
        process = launch([sys.executable, str(WORKER), "--out", str(out), "--token", SECRET], env, out)
        try:
            url = wait_for_status(out, 0, process)["prometheus_url"]
            assert url is not None, output_tail(out)
            wait_for_steps(url, 10)
            yield Job(process, url, receiver)
        finally:
            finish(process, out)


@pytest.mark.slow
def test_four_scrapers_for_30_s_during_training_see_no_error_and_p99_under_100_ms(job):
    _, steps_before = wait_for_steps(job.url, 10)
    report = sustained(job.url, clients=4, seconds=30, check=well_formed_training_scrape)
    _, steps_after = wait_for_steps(job.url, 0)
    print(f"4 scrapers for 30 s: {report.summary()}; training steps {steps_before:.0f} -> {steps_after:.0f}")
    assert report.errors == [], report.summary()
    assert len(report.latencies) >= 4 * 30, report.summary()
    assert report.percentile(99) < 0.100, report.summary()
    assert steps_after > steps_before  # training went on meanwhile


@pytest.mark.slow
def test_50_simultaneous_scrapers_are_all_answered_within_a_second(job):
    report = burst(job.url, clients=50, timeout=5.0, check=well_formed_training_scrape)
    print(f"50 simultaneous scrapers: {report.summary()}")
    assert report.errors == [], report.summary()
    assert len(report.latencies) == 50
    # A connection the kernel dropped from a full accept queue is retried after the 1 s SYN timeout.
    assert max(report.latencies) < 1.0, report.summary()


def _listening_addresses(pid: int, port: int) -> list[str]:
    return [c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]


def _non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


@pytest.mark.slow
def test_the_endpoint_listens_on_loopback_only(job):
    port = int(re.fullmatch(r"http://127\.0\.0\.1:(\d+)/metrics", job.url).group(1))
    assert _listening_addresses(job.process.pid, port) == ["127.0.0.1"]
    address = _non_loopback_ipv4()
    if address is not None:
        with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            sock.settimeout(2)
            sock.connect((address, port))
    assert fetch(job.url)[1]


@pytest.mark.slow
def test_a_secret_on_the_command_line_reaches_neither_the_scrape_nor_the_otlp_resource(job):
    assert job.receiver.wait_for({"llm.train.steps"}, timeout=10)
    resources = job.receiver.resource_attributes()
    assert resources
    for attributes in resources:
        assert attributes["deployment.environment.name"] == "reliability"  # OTEL_RESOURCE_ATTRIBUTES applied
        assert attributes["process.pid"] == job.process.pid  # and the process detector ran
        assert not {"process.command_args", "process.command_line"} & attributes.keys()
        assert SECRET not in repr(attributes)
    for accept in (None, OPENMETRICS):
        _, body = fetch(job.url, accept=accept)
        assert SECRET not in body
        (target,) = [labels for name, labels, _ in series(body) if name == "target_info"]
        assert target["process_pid"] == str(job.process.pid)
        assert target["deployment_environment_name"] == "reliability"
        assert "process_command_args" not in target and "process_command_line" not in target


# -- two ranks, one port held by another process ------------------------------------------------------------


@pytest.fixture
def held_base_port() -> Iterator[int]:
    """A port held by another process (listening on 127.0.0.1), with the port after it free."""
    with held_by_another_process(next_free=True) as port:
        yield port


@pytest.mark.slow
def test_two_ranks_with_the_base_port_held_rank_0_pushes_otlp_after_one_warning_and_rank_1_serves(
        tmp_path, held_base_port):
    base, steps = held_base_port, 20
    with GrpcMetricsReceiver() as receiver:
        env = job_env(OTEL_METRICS_EXPORTER="prometheus,otlp", OTEL_EXPORTER_PROMETHEUS_PORT=str(base),
                      **otlp_env(receiver, interval_ms=500))
        process = launch([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                          str(WORKER), "--out", str(tmp_path), "--steps", str(steps)], env, tmp_path)
        try:
            rank0 = wait_for_status(tmp_path, 0, process)
            rank1 = wait_for_status(tmp_path, 1, process)
            assert rank0["prometheus_url"] is None
            assert rank1["prometheus_url"] == f"http://127.0.0.1:{base + 1}/metrics"
            labels, _ = wait_for_steps(rank1["prometheus_url"], steps)
            assert (labels["llm_rank"], labels["llm_world_size"]) == ("1", "2")
        finally:
            finish(process, tmp_path)
        pushed = steps_pushed_by_rank(receiver)

    rank0_warnings = warnings_logged(tmp_path, 0)
    assert len(rank0_warnings) == 1, rank0_warnings
    assert f"127.0.0.1:{base}" in rank0_warnings[0] and "OTLP" in rank0_warnings[0]
    assert warnings_logged(tmp_path, 1) == []
    assert pushed == {0: steps, 1: steps}
    with socket.socket() as sock, pytest.raises(OSError):
        sock.bind(("127.0.0.1", base))  # still the other process's
