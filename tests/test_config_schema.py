"""Config validation and environment fallback, instrument()/shutdown lifecycle, and user metric schemas."""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import os
import re
import socket
import urllib.request
from pathlib import Path

import opentelemetry.environment_variables as otel_api_env
import opentelemetry.sdk.environment_variables as otel_sdk_env
import pytest

import otel_llm
from otel_llm import config as config_module
from otel_llm import environment_variables as env_module
from otel_llm.runtime.log_once import once
from otel_llm.session import active
from otel_llm.zero_code.instrumentor import TorchInstrumentor
from tests.support.training import tiny, train

pytestmark = pytest.mark.timeout(60)



@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* / torchrun variable of the outer environment leaks in; bad-env warnings are fresh."""
    for name in list(os.environ):
        if name.startswith("OTEL_") or name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name)
    config_module._bad_environment.forget()


# -- Config ---------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("sampling_interval", 0),
    ("sampling_interval", "x"),
    ("sampling_interval", -3),
    ("sampling_interval", True),
    ("exporters", "kafka"),
    ("exporters", "prometheus,kafka"),
    ("token_loss_samples", 1000),
    ("token_loss_samples", 0),
    ("shutdown_timeout", -1),
    ("shutdown_timeout", math.inf),
    ("disabled_signals", "llm.nope"),
    ("disabled_signals", "llm.grad.*,llm.nope.*"),
    ("prometheus_port", 70000),
    ("prometheus_port", -1),
    ("sampling", "sometimes"),
    ("grad_sparsity_threshold", -1e-3),
    ("sampling_warmup", -1),
    ("sampling_min_interval", 0),
    ("sampling_loss_window", 1),
    ("sampling_spike_sigma", 0),
    ("sampling_plateau_tolerance", -0.1),
    ("sampling_memory_limit", 1.5),
    ("anomaly_detection", "maybe"),
    ("anomaly_alphabet", 1),
    ("anomaly_threshold", -2),
])
def test_explicit_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(field)):
        otel_llm.Config(**{field: value})


@pytest.mark.parametrize(("field", "value"), [
    ("sampling_interval", 10.0),      # equal to the default, but not an integer
    ("prometheus_port", 9464.0),
    ("token_loss_samples", 512.0),
])
def test_explicit_non_integer_equal_to_the_default_is_rejected_too(field, value):
    """5.0 is rejected for an integer field; so must be the float that happens to equal the default."""
    with pytest.raises(ValueError, match=re.escape(field)):
        otel_llm.Config(**{field: 5.0})
    with pytest.raises(ValueError, match=re.escape(field)):
        otel_llm.Config(**{field: value})


@pytest.mark.parametrize(("values", "named"), [
    (dict(sampling_min_interval=50, sampling_max_interval=20), "sampling_max_interval"),
    (dict(anomaly_window=80, anomaly_baseline=64), "anomaly_baseline"),
    (dict(anomaly_window=8, anomaly_segments=3), "anomaly_segments"),
])
def test_explicit_contradicting_values_raise_naming_both(values, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        otel_llm.Config(**values)


def test_contradicting_environment_values_warn_and_fall_back(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="otel_llm")
    monkeypatch.setenv("OTEL_LLM_SAMPLING_MAX_INTERVAL", "5")
    config = otel_llm.Config()
    assert (config.sampling_min_interval, config.sampling_max_interval) == (20, 100)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "OTEL_LLM_SAMPLING_MAX_INTERVAL" in warning and "sampling_max_interval=5" in warning


def test_adaptive_sampling_and_anomaly_detection_are_the_defaults():
    config = otel_llm.Config()
    assert config.sampling == "adaptive" and config.anomaly_detection is True
    assert otel_llm.Config(anomaly_detection="off").anomaly_detection is False


def test_explicit_good_values_are_normalised():
    config = otel_llm.Config(sampling_interval="7", exporters="Prometheus, otlp, prometheus",
                             disabled_signals=["llm.grad.*"], shutdown_timeout="0.5", prometheus_port=0)
    assert config.sampling_interval == 7
    assert config.exporters == ("prometheus", "otlp")
    assert config.disabled_signals == ("llm.grad.*",)
    assert config.is_disabled("llm.grad.norm") and not config.is_disabled("llm.train.loss")
    assert config.shutdown_timeout == 0.5
    assert config.prometheus_port == 0


@pytest.mark.parametrize(("variable", "raw", "field", "default"), [
    ("OTEL_LLM_SAMPLING_INTERVAL", "ten", "sampling_interval", 10),
    ("OTEL_METRICS_EXPORTER", "kafka", "exporters", ("prometheus", "otlp")),
    ("OTEL_LLM_TOKEN_LOSS_SAMPLES", "100000", "token_loss_samples", 128),
    ("OTEL_EXPORTER_PROMETHEUS_PORT", "http", "prometheus_port", 9464),
    ("OTEL_LLM_DISABLED_SIGNALS", "llm.nope", "disabled_signals", ()),
])
def test_bad_environment_values_warn_once_and_fall_back(monkeypatch, caplog, variable, raw, field, default):
    caplog.set_level(logging.WARNING, logger="otel_llm")
    monkeypatch.setenv(variable, raw)
    assert getattr(otel_llm.Config(), field) == default
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert variable in warnings[0] and raw in warnings[0]
    caplog.clear()
    assert getattr(otel_llm.Config(), field) == default
    assert not [r for r in caplog.records if variable in r.getMessage()]  # logged once


def test_environment_fills_unset_fields_and_explicit_wins(monkeypatch):
    monkeypatch.setenv("OTEL_LLM_SAMPLING_INTERVAL", "7")
    monkeypatch.setenv("OTEL_LLM_TOKEN_LOSS_SAMPLES", "33")
    monkeypatch.setenv("OTEL_LLM_DISABLED_SIGNALS", "llm.attention.*, llm.rope.angle_deviation")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "9999")
    monkeypatch.setenv("OTEL_LLM_SHUTDOWN_TIMEOUT", "0.25")
    config = otel_llm.Config(token_loss_samples=5)
    assert config.sampling_interval == 7
    assert config.token_loss_samples == 5
    assert config.disabled_signals == ("llm.attention.*", "llm.rope.angle_deviation")
    assert config.exporters == ("otlp",)
    assert config.prometheus_port == 9999
    assert config.shutdown_timeout == 0.25
    # an explicit value wins even when it equals the built-in default
    assert otel_llm.Config(sampling_interval=10).sampling_interval == 10
    assert otel_llm.Config(exporters="prometheus,otlp").exporters == ("prometheus", "otlp")
    # an explicit bad value raises even when the environment is fine
    with pytest.raises(ValueError, match="sampling_interval"):
        otel_llm.Config(sampling_interval=0)


@pytest.mark.parametrize(("environment", "values"), [
    # the explicit minimum equals the environment's: it is still explicit
    ({"OTEL_LLM_SAMPLING_MIN_INTERVAL": "50"}, dict(sampling_min_interval=50, sampling_max_interval=20)),
    # one side explicit, the other from the environment: the explicit one must not be dropped silently
    ({"OTEL_LLM_SAMPLING_MAX_INTERVAL": "20"}, dict(sampling_min_interval=50)),
    ({"OTEL_LLM_ANOMALY_WINDOW": "8"}, dict(anomaly_window=8, anomaly_segments=3)),
])
def test_explicit_value_equal_to_the_environment_still_raises_on_a_broken_rule(monkeypatch, caplog, environment,
                                                                               values):
    caplog.set_level(logging.WARNING, logger="otel_llm")
    for name, raw in environment.items():
        monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=re.escape(next(iter(values)))):
        otel_llm.Config(**values)
    assert not caplog.records


def test_source_reports_explicit_environment_and_default(monkeypatch):
    monkeypatch.setenv("OTEL_LLM_SAMPLING_INTERVAL", "7")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "9999")
    monkeypatch.setenv("OTEL_LLM_TOKEN_LOSS_SAMPLES", "100000")  # bad: the default is used
    monkeypatch.setenv("OTEL_LLM_SAMPLING_MAX_INTERVAL", "5")  # breaks a rule: both sides fall back
    monkeypatch.setenv("OTEL_LLM_ANOMALY_BASELINE", "64")
    config = otel_llm.Config(shutdown_timeout=2.0, anomaly_baseline=64)  # both equal to the default
    assert config.source("sampling_interval") == "environment" and config.sampling_interval == 7
    assert config.source("prometheus_port") == "environment" and config.prometheus_port == 9999
    assert config.source("token_loss_samples") == "default"
    assert config.source("sampling_max_interval") == "default" and config.sampling_max_interval == 100
    assert config.source("sampling_min_interval") == "default"
    assert config.source("shutdown_timeout") == "explicit"
    assert config.source("anomaly_baseline") == "explicit"  # equal to the environment's value too
    assert config.source("anomaly_window") == "default"
    with pytest.raises(KeyError):
        config.source("no_such_field")


def test_replace_makes_every_value_explicit_and_provenance_stays_out_of_eq_and_repr(monkeypatch):
    monkeypatch.setenv("OTEL_LLM_SAMPLING_INTERVAL", "7")
    config = otel_llm.Config()
    changed = dataclasses.replace(config, sampling_warmup=5)
    assert (changed.sampling_interval, changed.sampling_warmup) == (7, 5)
    assert {changed.source(spec.name) for spec in dataclasses.fields(changed)} == {"explicit"}
    assert dataclasses.replace(config) == config
    assert otel_llm.Config(sampling_interval=7) == config
    assert hash(otel_llm.Config(sampling_interval=7)) == hash(config)
    assert repr(dataclasses.replace(config)) == repr(config) and "_sources" not in repr(config)
    assert "_sources" not in {spec.name for spec in dataclasses.fields(config)}


def test_environment_variable_constants_are_the_names_config_reads():
    read = {spec.metadata["env"] for spec in dataclasses.fields(otel_llm.Config)}
    own = {name for name in read if name.startswith("OTEL_LLM_")}
    assert set(env_module.__all__) == own
    assert all(getattr(env_module, name) == name for name in env_module.__all__)
    standard = {value for module in (otel_sdk_env, otel_api_env) for name, value in vars(module).items()
                if name.startswith("OTEL_")}
    assert read - own <= standard, "standard variables must be the SDK's own names"


def test_help_text_lives_only_in_the_config_fields():
    """Each constant's docstring only names its field; the meaning is in the field's help, once."""
    field_of = {spec.metadata["env"]: spec.name for spec in dataclasses.fields(otel_llm.Config)}
    source = Path(env_module.__file__).read_text(encoding="utf-8")
    body = ast.parse(source).body
    docstrings = {}
    for statement, following in zip(body, body[1:]):
        if isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr):
            docstrings[statement.target.id] = following.value.value
    assert docstrings == {name: f"Sets :attr:`otel_llm.Config.{field_of[name]}`." for name in env_module.__all__}
    for _, _, _, help_text in config_module.options():
        assert help_text not in source


def test_metrics_exporter_none_gives_no_readers(monkeypatch, sessions):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    config = otel_llm.Config(sampling_interval=1)
    assert config.exporters == ()
    model, optimizer = tiny()
    session = otel_llm.Instrumentation(model, optimizer, config=config)
    sessions.append(session)
    assert session.prometheus_url is None
    assert session._bundle.otlp_reader is None and session._bundle.prometheus_endpoint is None
    assert list(session.meter_provider._metric_readers) == []
    train(model, optimizer, 2)
    assert session.step == 2
    assert session.flush(2.0)


# -- instrument() / shutdown lifecycle ---------------------------------------------------


def test_instrument_rejects_non_module_and_non_optimizer():
    model, optimizer = tiny()
    config = otel_llm.Config(exporters="none")
    with pytest.raises(ValueError, match="model"):
        otel_llm.instrument(object(), optimizer, config=config)
    with pytest.raises(ValueError, match="optimizer"):
        otel_llm.instrument(model, "adamw", config=config)
    with pytest.raises(ValueError, match="optimizer"):
        otel_llm.instrument(model, model.parameters(), config=config)
    assert active() is None


def test_instrument_rejects_bad_types_while_a_session_is_active(sessions):
    model, optimizer = tiny()
    session = otel_llm.instrument(model, optimizer, config=otel_llm.Config(exporters="none"))
    sessions.append(session)
    with pytest.raises(ValueError, match="model"):
        otel_llm.instrument(object())
    with pytest.raises(ValueError, match="optimizer"):
        otel_llm.instrument(optimizer=object())


def test_instrument_twice_returns_the_same_live_session(sessions):
    model, optimizer = tiny()
    config = otel_llm.Config(exporters="none", sampling_interval=1)
    first = otel_llm.instrument(model, optimizer, config=config)
    sessions.append(first)
    second = otel_llm.instrument(model, optimizer, config=config)
    assert second is first
    assert active() is first
    train(model, optimizer, 3)
    assert first.step == 3  # hooks were not installed twice
    first.shutdown()
    third = otel_llm.instrument(model, optimizer, config=config)
    sessions.append(third)
    assert third is not first and not third.closed and third.step == 0


def test_shutdown_twice_is_harmless_and_removes_every_hook(sessions):
    model, optimizer = tiny()
    session = otel_llm.instrument(model, optimizer, config=otel_llm.Config(exporters="none", sampling_interval=1))
    sessions.append(session)
    train(model, optimizer, 2)
    session.shutdown()
    session.shutdown()
    assert session.closed and active() is None
    train(model, optimizer, 2)
    assert session.step == 2
    with session:  # __exit__ after shutdown too
        pass


def test_uninstrument_without_instrument_is_harmless():
    instrumentor = TorchInstrumentor()
    assert not instrumentor.is_instrumented_by_opentelemetry
    instrumentor.uninstrument()
    instrumentor.uninstrument()
    assert instrumentor.session is None and active() is None

    model, optimizer = tiny()
    instrumentor.instrument(model=model, optimizer=optimizer, config=otel_llm.Config(exporters="none"))
    try:
        session = instrumentor.session
        assert session is not None and active() is session
        train(model, optimizer, 1)
        assert session.step == 1
    finally:
        instrumentor.uninstrument()
    instrumentor.uninstrument()
    assert session.closed and instrumentor.session is None and active() is None


# -- schema files -------------------------------------------------------------------------

VALID = """\
metrics:
  - name: llm.custom.rollouts
    instrument: counter
    unit: "{rollout}"
    description: Rollouts generated.
    attributes: [llm.custom.env]
  - name: llm.custom.reward
    instrument: histogram
    description: Reward per rollout.
    attributes: [llm.custom.env]
    buckets: [0.0, 0.25, 0.5, 1.0]
  - name: llm.custom.kl
    instrument: gauge
    description: KL to the reference policy.
"""


def start_expecting_schema_error(*args, **kwargs) -> otel_llm.SchemaError:
    """Start a session that must fail with SchemaError; one that starts anyway is shut down, then fails."""
    try:
        session = otel_llm.Instrumentation(*args, **kwargs)
    except otel_llm.SchemaError as exc:
        return exc
    session.shutdown()
    pytest.fail("DID NOT RAISE SchemaError")


def write(tmp_path: Path, text: str, name: str = "schema.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_schema_metrics_are_recorded_with_declared_buckets_and_attributes(harness, tmp_path):
    path = write(tmp_path, VALID)
    model, optimizer = tiny()
    h = harness(model, optimizer, schema_path=str(path), sampling_interval=1)
    train(model, optimizer, 2)
    otel_llm.record("llm.custom.rollouts", 3, {"llm.custom.env": "math"})
    otel_llm.record("llm.custom.rollouts", 4, {"llm.custom.env": "math", "undeclared": "dropped"})
    otel_llm.record("llm.custom.rollouts", 1, {"llm.custom.env": "code"})
    for reward in (0.0, 0.25, 0.75, 2.0):
        otel_llm.record("llm.custom.reward", reward, {"llm.custom.env": "math"})
    otel_llm.record("llm.custom.reward", -0.5, {"llm.custom.env": "math"})  # dropped: negative
    otel_llm.record("llm.custom.kl", 0.125)
    otel_llm.record("llm.custom.kl", 0.0625)
    m = h.collect()
    assert m.value("llm.custom.rollouts", llm_custom_env="math") == 7
    assert m.value("llm.custom.rollouts", llm_custom_env="code") == 1
    hist = m.histogram("llm.custom.reward")
    assert dict(hist.attributes) == {"llm.custom.env": "math"}
    assert list(hist.explicit_bounds) == [0.0, 0.25, 0.5, 1.0]
    assert list(hist.bucket_counts) == [1, 1, 0, 1, 1]
    assert hist.count == 4 and hist.sum == pytest.approx(3.0)
    assert m.value("llm.custom.kl") == 0.0625
    assert m.value("llm.train.steps") == 2  # the catalog is still there


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_schema_from_environment_shows_up_in_a_prometheus_scrape(monkeypatch, tmp_path, sessions):
    monkeypatch.setenv("OTEL_LLM_SCHEMA", str(write(tmp_path, VALID)))
    model, optimizer = tiny()
    session = otel_llm.instrument(model, optimizer, config=otel_llm.Config(exporters="prometheus", prometheus_port=0))
    sessions.append(session)
    assert session.config.schema_path == str(tmp_path / "schema.yaml")
    train(model, optimizer, 1)
    otel_llm.record("llm.custom.rollouts", 2, {"llm.custom.env": "math"})
    otel_llm.record("llm.custom.reward", 0.75, {"llm.custom.env": "math"})
    otel_llm.record("llm.custom.kl", 0.5)
    assert session.flush(5.0)
    with urllib.request.urlopen(session.prometheus_url, timeout=5) as response:
        body = response.read().decode()
    lines = [line for line in body.splitlines() if line.startswith("llm_custom_")]
    rollouts = [line for line in lines if line.startswith("llm_custom_rollouts_total{")]
    assert len(rollouts) == 1 and 'llm_custom_env="math"' in rollouts[0] and rollouts[0].endswith(" 2.0")
    le = [re.search(r'le="([^"]+)"', line).group(1) for line in lines if line.startswith("llm_custom_reward_bucket")]
    assert le == ["0.0", "0.25", "0.5", "1.0", "+Inf"]
    counts = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("llm_custom_reward_bucket")]
    assert counts == [0, 0, 0, 1, 1]
    assert [line.rsplit(" ", 1)[1] for line in lines if line.startswith("llm_custom_kl{")] == ["0.5"]


BAD_SCHEMAS = [
    # (id, yaml, entry text that must be named, rule fragment)
    ("digit-name", "metrics:\n  - {name: 9bad, instrument: gauge}\n", "#0 (9bad)", "not a legal OpenMetrics name"),
    ("space-name", "metrics:\n  - {name: llm.custom.ok, instrument: gauge}\n  - {name: has space, instrument: gauge}\n",
     "#1 (has space)", "not a legal OpenMetrics name"),
    ("dash-name", "metrics:\n  - {name: llm.ok-dash, instrument: gauge}\n", "#0 (llm.ok-dash)",
     "not a legal OpenMetrics name"),
    ("reserved-suffix", "metrics:\n  - {name: my.metric_total, instrument: counter}\n", "#0 (my.metric_total)",
     "suffix OpenMetrics reserves"),
    ("unknown-instrument", "metrics:\n  - {name: llm.custom.s, instrument: summary}\n", "#0 (llm.custom.s)",
     "unknown instrument 'summary'"),
    ("buckets-not-increasing",
     "metrics:\n  - {name: llm.custom.h, instrument: histogram, buckets: [1, 1, 2]}\n",
     "#0 (llm.custom.h)", "strictly increasing"),
    ("buckets-not-finite", "metrics:\n  - {name: llm.custom.h, instrument: histogram, buckets: [1, .inf]}\n",
     "#0 (llm.custom.h)", "finite"),
    ("buckets-on-counter", "metrics:\n  - {name: llm.custom.c, instrument: counter, buckets: [1, 2]}\n",
     "#0 (llm.custom.c)", "only allowed on histograms"),
    ("builtin-clash", "metrics:\n  - {name: llm.train.loss, instrument: gauge}\n", "#0 (llm.train.loss)",
     "clashes with 'llm.train.loss'"),
    ("prometheus-clash", "metrics:\n  - {name: llm_train_loss, instrument: gauge}\n", "#0 (llm_train_loss)",
     "clashes with 'llm.train.loss'"),
    # OpenMetrics names a counter's family without _total: a gauge llm_train_steps is a second
    # `# TYPE llm_train_steps` family beside the built-in counter llm.train.steps
    ("prometheus-family-clash", "metrics:\n  - {name: llm_train_steps, instrument: gauge}\n",
     "#0 (llm_train_steps)", "clashes with 'llm.train.steps'"),
    ("duplicate",
     "metrics:\n  - {name: llm.custom.a, instrument: gauge}\n  - {name: llm.custom.a, instrument: counter}\n",
     "#1 (llm.custom.a)", "clashes with 'llm.custom.a'"),
    ("duplicate-after-translation",
     "metrics:\n  - {name: llm.custom.lat, instrument: histogram, unit: s}\n"
     "  - {name: llm.custom.lat_seconds, instrument: gauge}\n",
     "#1 (llm.custom.lat_seconds)", "clashes with 'llm.custom.lat'"),
    ("not-a-mapping", "metrics:\n  - llm.custom.a\n", "#0", "must be a mapping"),
    ("unknown-key", "metrics:\n  - {name: llm.custom.a, instrument: gauge, bucket: [1]}\n", "#0 (llm.custom.a)",
     "unknown keys ['bucket']"),
]


@pytest.mark.parametrize(("text", "entry", "rule"), [case[1:] for case in BAD_SCHEMAS],
                         ids=[case[0] for case in BAD_SCHEMAS])
def test_invalid_schema_entries_fail_at_start_naming_file_entry_and_rule(tmp_path, text, entry, rule):
    path = write(tmp_path, text)
    port = _free_port()
    model, optimizer = tiny()
    error = start_expecting_schema_error(model, optimizer, config=otel_llm.Config(
        schema_path=str(path), exporters="prometheus", prometheus_port=port))
    message = str(error)
    assert str(path) in message
    assert f"entry {entry}" in message
    assert rule in message
    assert isinstance(error, ValueError)
    assert active() is None  # nothing half-started
    with socket.socket() as s:  # the endpoint was never opened
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize(("text", "rule"), [
    ("metrics: [\n  - {name: x\n", "not valid YAML"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("metrics: {name: llm.custom.a}\n", "top level must be a mapping"),
], ids=["invalid-yaml", "top-level-list", "metrics-not-a-list"])
def test_invalid_schema_files_fail_naming_the_file(tmp_path, text, rule):
    path = write(tmp_path, text)
    error = start_expecting_schema_error(config=otel_llm.Config(schema_path=str(path), exporters="none"))
    assert str(path) in str(error) and rule in str(error)
    assert active() is None


def test_missing_schema_file_fails_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "nowhere" / "schema.yaml"
    monkeypatch.setenv("OTEL_LLM_SCHEMA", str(path))
    error = start_expecting_schema_error(config=otel_llm.Config(exporters="none"))
    assert str(path) in str(error) and "cannot read the file" in str(error)
    assert active() is None


def test_empty_schema_file_declares_nothing(harness, tmp_path, caplog):
    h = harness(schema_path=str(write(tmp_path, "")))
    once.forget()
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        h.session.record("llm.custom.kl", 1.0)
    assert "no such user metric" in caplog.text
    assert "llm.custom.kl" not in h.collect().names()


# -- register() and record() at run time ----------------------------------------------------


def test_register_at_runtime_records_with_declared_buckets(harness):
    model, optimizer = tiny()
    h = harness(model, optimizer, sampling_interval=1)
    spec = otel_llm.register("llm.custom.accept_len", "histogram", unit="{token}", description="Accepted draft length.",
                             attributes=["llm.custom.draft"], buckets=[1, 2, 4, 8])
    assert spec.buckets == (1.0, 2.0, 4.0, 8.0) and spec.instrument == "histogram"
    otel_llm.register("llm.custom.accepted", "counter", unit="{token}")
    otel_llm.register("llm.custom.queue", "up_down_counter")
    train(model, optimizer, 1)
    for length in (1, 3, 3, 9):
        otel_llm.record("llm.custom.accept_len", length, {"llm.custom.draft": "small"})
    otel_llm.record("llm.custom.accepted", 16)
    otel_llm.record("llm.custom.queue", 5)
    otel_llm.record("llm.custom.queue", -2)
    m = h.collect()
    hist = m.histogram("llm.custom.accept_len")
    assert list(hist.explicit_bounds) == [1.0, 2.0, 4.0, 8.0]
    assert list(hist.bucket_counts) == [1, 0, 2, 0, 1]
    assert m.value("llm.custom.accepted") == 16
    assert m.value("llm.custom.queue") == 3
    assert m.value("llm.train.steps") == 1
    otel_llm.record("llm.custom.accepted", -1)  # a counter cannot decrease: dropped (OTel semantics)
    assert h.collect().value("llm.custom.accepted") == 16


def test_registered_metrics_keep_only_declared_attributes_and_always_have_help_text(harness):
    h = harness()
    spec = otel_llm.register("llm.custom.reward", "gauge", attributes=["llm.custom.policy"])
    assert spec.description == "User metric llm.custom.reward."
    otel_llm.record("llm.custom.reward", 0.5, {"llm.custom.policy": "a", "undeclared": "x"})
    assert h.collect().value("llm.custom.reward", llm_custom_policy="a") == 0.5


@pytest.mark.parametrize(("args", "kwargs", "rule"), [
    (("9bad", "gauge"), {}, "not a legal OpenMetrics name"),
    (("has space", "gauge"), {}, "not a legal OpenMetrics name"),
    (("llm.ok-dash", "gauge"), {}, "not a legal OpenMetrics name"),
    (("my.metric_total", "counter"), {}, "suffix OpenMetrics reserves"),
    (("llm.custom.s", "summary"), {}, "unknown instrument"),
    (("llm.custom.h", "histogram"), {"buckets": [1, 1, 2]}, "strictly increasing"),
    (("llm.custom.h", "histogram"), {"buckets": [1, math.inf]}, "finite"),
    (("llm.custom.c", "counter"), {"buckets": [1, 2]}, "only allowed on histograms"),
    (("llm.train.loss", "gauge"), {}, "clashes with 'llm.train.loss'"),
    (("llm_train_loss", "gauge"), {}, "clashes with 'llm.train.loss'"),
    (("llm.custom.kl", "counter"), {}, "clashes with 'llm.custom.kl'"),  # declared in the file
    (("llm.custom.lat_seconds", "gauge"), {}, "clashes with 'llm.custom.lat'"),  # file: histogram in s
])
def test_register_validates_like_the_schema_file(harness, tmp_path, args, kwargs, rule):
    path = write(tmp_path, VALID + "  - {name: llm.custom.lat, instrument: histogram, unit: s}\n")
    h = harness(schema_path=str(path))
    with pytest.raises(otel_llm.SchemaError) as info:
        otel_llm.register(*args, **kwargs)
    assert rule in str(info.value)
    assert repr(args[0]) in str(info.value)
    if args[0] != "llm.custom.kl":  # a rejected name is not half-registered
        h.session.record(args[0], 1.0)
        assert args[0] not in h.collect().names()


def test_register_twice_and_translation_clash_between_registered_metrics(harness):
    h = harness()
    otel_llm.register("llm.custom.wait", "histogram", unit="s")
    with pytest.raises(otel_llm.SchemaError, match="clashes with 'llm.custom.wait'"):
        otel_llm.register("llm.custom.wait", "histogram", unit="s")
    # both would be exported as llm_custom_wait_seconds
    with pytest.raises(otel_llm.SchemaError, match="clashes with 'llm.custom.wait'"):
        otel_llm.register("llm.custom.wait_seconds", "gauge")
    h.session.record("llm.custom.wait", 0.5)
    assert h.collect().histogram("llm.custom.wait").count == 1


def test_record_of_an_unknown_name_is_dropped_with_one_warning(harness, tmp_path, caplog):
    h = harness(schema_path=str(write(tmp_path, VALID)))
    once.forget()
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        otel_llm.record("llm.custom.nope", 1.0)
        otel_llm.record("llm.train.loss", 1.0)  # built-ins are not user-recordable
        otel_llm.record("llm.custom.nope", 2.0)
    warnings = [r.getMessage() for r in caplog.records if "no such user metric" in r.getMessage()]
    assert len(warnings) == 1 and "llm.custom.nope" in warnings[0]
    names = h.collect().names()
    assert "llm.custom.nope" not in names and "llm.train.loss" not in names


def test_record_without_a_session_is_dropped_with_one_warning(caplog):
    assert active() is None
    once.forget()
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        otel_llm.record("llm.custom.kl", 1.0)
        otel_llm.record("llm.custom.kl", 2.0)
    assert sum("without a running session" in r.getMessage() for r in caplog.records) == 1


def test_nonfinite_records_are_counted_not_exported(harness, tmp_path):
    h = harness(schema_path=str(write(tmp_path, VALID)))
    otel_llm.record("llm.custom.kl", float("nan"))
    otel_llm.record("llm.custom.reward", float("inf"), {"llm.custom.env": "math"})
    otel_llm.record("llm.custom.reward", float("-inf"), {"llm.custom.env": "math"})
    otel_llm.record("llm.custom.rollouts", float("nan"), {"llm.custom.env": "math"})
    m = h.collect()
    assert m.value("llm.telemetry.nonfinite", llm_signal="llm.custom.kl") == 1
    assert m.value("llm.telemetry.nonfinite", llm_signal="llm.custom.reward") == 2
    assert m.value("llm.telemetry.nonfinite", llm_signal="llm.custom.rollouts") == 1
    assert "llm.custom.kl" not in m.names()
    assert "llm.custom.reward" not in m.names()
    assert "llm.custom.rollouts" not in m.names()

    otel_llm.record("llm.custom.kl", 0.5)
    otel_llm.record("llm.custom.reward", 0.75, {"llm.custom.env": "math"})
    m = h.collect()
    assert m.value("llm.custom.kl") == 0.5
    assert m.histogram("llm.custom.reward").count == 1
    assert m.histogram("llm.custom.reward").sum == 0.75
    assert m.value("llm.telemetry.nonfinite", llm_signal="llm.custom.kl") == 1
