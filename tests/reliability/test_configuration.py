"""Configuration problems never stop training.

An explicit ``Config(...)`` argument out of range raises ValueError naming the
field. A bad environment variable, otel_llm's own or a standard OTEL_* one the
SDK would read, logs one line naming the variable, the value and what is used
instead; the run keeps every reader that can still work.
"""

from __future__ import annotations

import logging
import re
import tracemalloc
from collections.abc import Iterator

import pytest

import otel_llm
from otel_llm import config as config_module
from otel_llm.pipeline.anomaly import make_monitor
from otel_llm.runtime.log_once import once
from otel_llm.runtime.rank import rank_info
from tests.support.backends import free_port
from tests.support.collectors import otlp_env
from tests.support.receivers import GrpcMetricsReceiver, HttpMetricsReceiver
from tests.support.scrape import fetch, sample
from tests.support.training import tiny, train

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    """Each bad value is logged once per process; every test here starts as a fresh process would."""
    config_module._bad_environment.forget()
    once.forget()
    yield


def start(sessions: list[otel_llm.Instrumentation], model=None, optimizer=None, **config) -> otel_llm.Instrumentation:
    config.setdefault("sampling", "fixed")
    session = otel_llm.Instrumentation(model, optimizer, config=otel_llm.Config(**config))
    sessions.append(session)
    return session


def lines_naming(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# -- otel_llm's own variables and the OTEL_* ones in Config ----------------------------------------------------

HUGE = "100000000000000000000000"  # 1e23 written out: an integer, just far too large

ENVIRONMENT_CASES = [
    ("OTEL_LLM_ANOMALY_ALPHABET", HUGE, "anomaly_alphabet", 8),  # hung instrument() > 60 s
    ("OTEL_LLM_ANOMALY_ALPHABET", "1e23", "anomaly_alphabet", 8),
    ("OTEL_LLM_ANOMALY_BASELINE", HUGE, "anomaly_baseline", 64),
    ("OTEL_LLM_ANOMALY_BASELINE", "100000", "anomaly_baseline", 64),  # with a window of 1000: 2.4 GB
    ("OTEL_LLM_SAMPLING_LOSS_WINDOW", HUGE, "sampling_loss_window", 20),
    ("OTEL_LLM_UPDATE_SAMPLE_SEED", str(2**70), "update_sample_seed", 0),  # loss signals silently lost
    ("OTEL_LLM_UPDATE_SAMPLE_SIZE", HUGE, "update_sample_size", 65536),
    ("OTEL_LLM_SAMPLING_INTERVAL", "9" * 5000, "sampling_interval", 10),  # past int()'s digit limit
    ("OTEL_LLM_SHUTDOWN_TIMEOUT", "1e30", "shutdown_timeout", 2.0),
    ("OTEL_METRIC_EXPORT_INTERVAL", "10000000000000", "export_interval_ms", 60000),  # killed the OTLP thread
    ("OTEL_METRIC_EXPORT_TIMEOUT", "banana", "export_timeout_ms", 30000),
    ("OTEL_EXPORTER_PROMETHEUS_PORT", "65536", "prometheus_port", 9464),
    ("OTEL_EXPORTER_PROMETHEUS_HOST", "http://[::1", "prometheus_host", "127.0.0.1"),
]


@pytest.mark.parametrize(("variable", "raw", "field", "used"), ENVIRONMENT_CASES,
                         ids=[f"{case[0]}={case[1][:12]}" for case in ENVIRONMENT_CASES])
def test_a_bad_variable_logs_one_line_naming_it_and_the_run_trains_with_the_default(
        monkeypatch, caplog, harness, variable, raw, field, used):
    monkeypatch.setenv(variable, raw)
    model, optimizer = tiny()
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        h = harness(model, optimizer, sampling_interval=1) if field != "sampling_interval" else harness(
            model, optimizer)
        train(model, optimizer, 3)
        metrics = h.collect()
    assert getattr(h.session.config, field) == used
    (line,) = lines_naming(caplog, variable)
    assert raw[:40] in line and f"using {used!r} instead" in line
    assert len(line) < 400  # a 5,000-digit value is cut short, not logged whole
    assert metrics.value("llm.train.steps") == 3
    assert metrics.names() >= {"llm.train.loss", "llm.loss.token_skewness", "llm.grad.norm"}


UPPER_BOUNDS = [
    ("anomaly_alphabet", 10**23), ("anomaly_alphabet", 257), ("anomaly_baseline", 100_000), ("anomaly_window", 1025),
    ("sampling_loss_window", 10**23), ("sampling_interval", 10**5000), ("sampling_warmup", 10**10),
    ("update_sample_seed", 2**70), ("update_sample_size", 2**23), ("attention_queries", 10**9),
    ("export_interval_ms", 10**13), ("export_timeout_ms", 10**13), ("export_timeout_ms", 0),
    ("shutdown_timeout", 1e30), ("prometheus_host", "http://[::1"), ("prometheus_host", "bad host"),
]


@pytest.mark.parametrize(("field", "value"), UPPER_BOUNDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(UPPER_BOUNDS)])
def test_explicit_values_past_their_bound_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        otel_llm.Config(**{field: value})
    assert len(str(info.value)) < 300


def test_the_largest_anomaly_settings_keep_the_detector_within_a_few_megabytes():
    """256 series at baseline 1024, window 512, segments 512: each series used to keep a baseline x window index
    (2.1 MB), 540 MB for these; a score now needs only baseline x segments temporaries."""
    config = otel_llm.Config(anomaly_baseline=1024, anomaly_window=512, anomaly_segments=512, exporters="none")
    monitor = make_monitor(config)
    assert monitor is not None
    tracemalloc.start()
    try:
        monitor.observe(0, {"llm.attention.logit_max": [({"llm.layer": str(layer)}, 1.0) for layer in range(256)]})
        created, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for step in range(1, 1536):  # one series' history fills up and is scored at every step from then on
            monitor.observe(step, {"llm.train.loss": [({}, float(1 + step % 7))]})
        _, scoring_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert created < 4 * 2**20, f"{created / 2**20:.1f} MiB for 256 new series"
    assert scoring_peak < 24 * 2**20, f"{scoring_peak / 2**20:.1f} MiB while scoring"


# -- the standard OTLP variables the SDK would parse itself ------------------------------------------------------

OTLP_CASES = [  # (protocol, variable, raw): each used to raise from the exporter or the MeterProvider
    ("grpc", "OTEL_EXPORTER_OTLP_TIMEOUT", "banana"),
    ("grpc", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "1e30"),
    ("grpc", "OTEL_EXPORTER_OTLP_COMPRESSION", "zip"),
    ("http/protobuf", "OTEL_EXPORTER_OTLP_COMPRESSION", "zip"),
    ("grpc", "OTEL_EXPORTER_OTLP_ENDPOINT", "http://[::1"),
    ("http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT", "http://[::1"),
    ("grpc", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://collector:99999"),
    ("http/protobuf", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://[::1"),
    ("grpc", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "banana"),
    ("grpc", "OTEL_METRICS_EXEMPLAR_FILTER", "banana"),
]


@pytest.mark.parametrize(("protocol", "variable", "raw"), OTLP_CASES,
                         ids=[f"{p}-{v.removeprefix('OTEL_')}={r}" for p, v, r in OTLP_CASES])
def test_a_bad_standard_otlp_variable_logs_one_line_and_both_readers_keep_exporting(
        monkeypatch, caplog, sessions, protocol, variable, raw):
    with (GrpcMetricsReceiver() if protocol == "grpc" else HttpMetricsReceiver()) as receiver:
        otlp_env(monkeypatch, protocol, receiver.port)
        if variable.startswith("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)  # what the bad one falls back to
        monkeypatch.setenv(variable, raw)
        model, optimizer = tiny()
        with caplog.at_level(logging.WARNING, logger="otel_llm"):
            session = start(sessions, model, optimizer, exporters="prometheus,otlp", prometheus_port=0,
                            sampling_interval=1)
        (line,) = lines_naming(caplog, variable + "=")
        assert raw in line and "instead" in line
        train(model, optimizer, 3)
        assert session.flush(5.0)
        assert receiver.wait_for({"llm.train.steps"}, timeout=5)
        assert receiver.points("llm.train.steps")[-1].value == 3
        assert sample(fetch(session.prometheus_url)[1], "llm_train_steps_total") == 3


def test_an_otlp_setting_otel_llm_does_not_read_costs_the_otlp_reader_alone(monkeypatch, caplog, sessions):
    """The gRPC exporter parses its retryable codes itself and raised KeyError from instrument()."""
    monkeypatch.setenv("OTEL_PYTHON_EXPORTER_OTLP_GRPC_RETRYABLE_ERROR_CODES", "banana")
    model, optimizer = tiny()
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        session = start(sessions, model, optimizer, exporters="prometheus,otlp", prometheus_port=0,
                        sampling_interval=1)
    (line,) = lines_naming(caplog, "cannot build the OTLP exporter")
    assert "BANANA" in line
    assert session._bundle.otlp_reader is None
    train(model, optimizer, 2)
    assert sample(fetch(session.prometheus_url)[1], "llm_train_steps_total") == 2


# -- torchrun's variables ---------------------------------------------------------------------------------------

RANK_CASES = [
    ({"LOCAL_RANK": "-3"}, "LOCAL_RANK", (0, 0, 1)),  # served on base port - 3
    ({"LOCAL_RANK": "one", "RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK", (1, 0, 2)),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE", (0, 0, 1)),
    ({"WORLD_SIZE": "-2", "RANK": "0"}, "WORLD_SIZE", (0, 0, 1)),
    ({"RANK": "-1", "WORLD_SIZE": "4"}, "RANK", (0, 0, 4)),
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5", (5, 0, 6)),
    ({"LOCAL_RANK": HUGE}, "LOCAL_RANK", (0, 0, 1)),
]


@pytest.mark.parametrize(("environ", "named", "expected"), RANK_CASES, ids=[c[1] + "-" + str(i)
                                                                            for i, c in enumerate(RANK_CASES)])
def test_bad_rank_variables_warn_once_and_fall_back(monkeypatch, caplog, environ, named, expected):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        ranks = rank_info()
        assert rank_info() == ranks  # asked again: no second line
    assert (ranks.rank, ranks.local_rank, ranks.world_size) == expected
    assert len(lines_naming(caplog, named)) == 1
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_a_negative_local_rank_serves_on_the_base_port(monkeypatch, caplog, sessions):
    base = free_port()
    monkeypatch.setenv("LOCAL_RANK", "-3")
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        session = start(sessions, exporters="prometheus", prometheus_port=base)
    assert session.prometheus_url == f"http://127.0.0.1:{base}/metrics"
    assert len(lines_naming(caplog, "LOCAL_RANK")) == 1


def test_a_base_port_plus_local_rank_past_65535_serves_on_a_port_the_os_picks(monkeypatch, caplog, sessions):
    monkeypatch.setenv("LOCAL_RANK", "1")
    model, optimizer = tiny()
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        session = start(sessions, model, optimizer, exporters="prometheus", prometheus_port=65535,
                        sampling_interval=1)
    url = session.prometheus_url
    assert url is not None and not url.endswith(":65535/metrics")
    assert len(lines_naming(caplog, "past 65535")) == 1
    assert len(lines_naming(caplog, url)) == 1  # the URL actually served is said
    train(model, optimizer, 2)
    assert sample(fetch(url)[1], "llm_train_steps_total") == 2


# -- a broken OTEL_LLM_SCHEMA -----------------------------------------------------------------------------------

BROKEN_SCHEMAS = {  # file content (None: no file), what the one error line says
    "missing": (None, "cannot read the file"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
    "unquoted-unit": (b"metrics:\n  - name: llm.custom.tokens\n    instrument: counter\n    unit: {token}\n",
                      'quote it: unit: "{token}"'),
}


def broken_schema(tmp_path, kind: str) -> str:
    content, _ = BROKEN_SCHEMAS[kind]
    path = tmp_path / "schema.yaml"
    if content is not None:
        path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("kind", list(BROKEN_SCHEMAS))
def test_the_explicit_api_raises_a_schema_error_naming_the_file(tmp_path, kind):
    path = broken_schema(tmp_path, kind)
    with pytest.raises(otel_llm.SchemaError) as info:
        otel_llm.instrument(config=otel_llm.Config(schema_path=path, exporters="none"))
    assert path in str(info.value) and BROKEN_SCHEMAS[kind][1] in str(info.value)


@pytest.mark.parametrize("kind", list(BROKEN_SCHEMAS))
def test_zero_code_with_a_broken_schema_logs_one_error_line_and_exports_the_built_ins(monkeypatch, caplog, tmp_path,
                                                                                    kind):
    """What ``opentelemetry-instrument`` runs (the instrumentor, here without the launcher's configurator)."""
    from otel_llm.zero_code.instrumentor import TorchInstrumentor

    path = broken_schema(tmp_path, kind)
    port = free_port()
    monkeypatch.setenv("OTEL_LLM_SCHEMA", path)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    instrumentor = TorchInstrumentor()
    with caplog.at_level(logging.INFO, logger="otel_llm"):
        instrumentor.instrument()
    try:
        model, optimizer = tiny()
        train(model, optimizer, 3)
        assert instrumentor.session is not None and instrumentor.session.step == 3
        assert instrumentor.session.flush(5.0)
        assert sample(fetch(f"http://127.0.0.1:{port}/metrics")[1], "llm_train_steps_total") == 3
    finally:
        instrumentor.uninstrument()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert path in errors[0] and BROKEN_SCHEMAS[kind][1] in errors[0] and "built-in metrics" in errors[0]
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.slow
def test_a_script_under_opentelemetry_instrument_with_a_missing_schema_prints_one_line_and_exports(tmp_path):
    from tests.support.zero_code import TRAIN_STEPS, TrainProcess, scrape_until

    path = broken_schema(tmp_path, "missing")
    process = TrainProcess("nanogpt_train.py", tmp_path,
                           {"OTEL_LLM_SCHEMA": path, "OTEL_METRICS_EXPORTER": "prometheus"})
    try:
        process.start()
        process.wait_trained()
        # the loop's last steps reach the endpoint within two batch windows of its pause
        steps = scrape_until(process, lambda s: s.samples.get("llm_train_steps_total", [(None, 0)])[0][1]
                             == TRAIN_STEPS, timeout=10)
        assert steps.samples["llm_train_steps_total"][0][1] == TRAIN_STEPS
        assert process.release_and_wait() == 0
    finally:
        process.kill()
    stderr = process.stderr_path.read_text(errors="replace")
    assert "Traceback" not in stderr, process.report()
    assert len([line for line in stderr.splitlines() if path in line]) == 1, process.report()
