"""What a user hands otel_llm from inside the loop never raises into it."""

from __future__ import annotations

import logging

import pytest
import torch
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

import otel_llm
from otel_llm.export.views import OVERFLOW_ATTRIBUTE, SDK_CARDINALITY_LIMIT
from otel_llm.runtime.log_once import once
from tests.models import GPT
from tests.support.backends import promtool_check_metrics
from tests.support.scrape import fetch
from tests.support.training import tiny, train

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture(autouse=True)
def fresh_warnings() -> None:
    """Every test here counts warnings given once per process: start as a fresh process would."""
    once.forget()


@pytest.mark.parametrize("bad", [torch.ones(2), "4.2", None, [1.0]], ids=["two-element", "string", "none", "list"])
def test_record_loss_with_a_wrong_value_is_dropped_with_one_warning_on_every_step(harness, caplog, bad):
    """Checked on unsampled steps too (interval 3), so the mistake shows at step 0, not as a crash at step 3."""
    once.forget()
    model = GPT(vocab=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    h = harness(model, optimizer, sampling_interval=3)
    idx = torch.randint(0, 64, (2, 16))
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        for _ in range(4):
            _, loss = model(idx, idx)
            loss.backward()
            h.session.record_loss(bad)
            optimizer.step()
            optimizer.zero_grad()
    warnings = [r for r in caplog.records if "record_loss() takes a number" in r.getMessage()]
    assert len(warnings) == 1
    assert h.collect().value("llm.train.steps") == 4


def test_a_second_instrument_with_another_config_says_the_running_session_was_kept(caplog):
    first = otel_llm.instrument(config=otel_llm.Config(exporters="none"))
    try:
        with caplog.at_level(logging.WARNING, logger="otel_llm"):
            same = otel_llm.instrument(config=otel_llm.Config(exporters="none"))
            second = otel_llm.instrument(config=otel_llm.Config(exporters="none", sampling_interval=7))
        assert first is same is second
        assert second.config.sampling_interval != 7
        assert sum("returned unchanged" in r.getMessage() for r in caplog.records) == 1
    finally:
        first.shutdown()


# -- names of user metrics ---------------------------------------------------------------------------------------

TAKEN_NAMES = [  # (name, instrument, unit, what the rejection names): each broke promtool and the OpenMetrics parser
    ("process_resident_memory_bytes", "gauge", "1", "process collector"),
    ("process.cpu.seconds", "counter", "1", "process collector"),
    ("process.cpu", "counter", "s", "process collector"),  # exported as process_cpu_seconds_total
    ("python_gc_objects", "gauge", "1", "platform and GC collectors"),
    ("target", "gauge", "1", "target_info"),
    ("llm.custom.latency", "gauge", "created", "reserves"),  # exported as llm_custom_latency_created
    ("llm.custom.events", "histogram", "count", "reserves"),
]


@pytest.mark.parametrize(("name", "instrument", "unit", "named"), TAKEN_NAMES,
                         ids=[n[0] + "-" + n[2] for n in TAKEN_NAMES])
def test_user_metric_names_the_exposition_already_has_are_rejected_by_register_and_the_schema_file(
        harness, tmp_path, name, instrument, unit, named):
    harness()
    with pytest.raises(otel_llm.SchemaError) as registered:
        otel_llm.register(name, instrument, unit=unit)
    assert repr(name) in str(registered.value) and named in str(registered.value)
    path = tmp_path / "schema.yaml"
    path.write_text(f"metrics:\n  - {{name: {name}, instrument: {instrument}, unit: '{unit}'}}\n")
    with pytest.raises(otel_llm.SchemaError) as declared:
        otel_llm.Instrumentation(config=otel_llm.Config(schema_path=str(path), exporters="none"))
    assert str(path) in str(declared.value) and named in str(declared.value)


def test_the_exposition_with_user_metrics_passes_promtool_and_the_openmetrics_parser(sessions):
    model, optimizer = tiny()
    session = otel_llm.Instrumentation(model, optimizer, config=otel_llm.Config(
        exporters="prometheus", prometheus_port=0, sampling="fixed", sampling_interval=1))
    sessions.append(session)
    for name, instrument, unit in (("llm.custom.reward", "gauge", "1"), ("processing.time", "histogram", "s"),
                                   ("targets", "counter", "{target}")):
        otel_llm.register(name, instrument, unit=unit)
        otel_llm.record(name, 1.5)
    train(model, optimizer, 2)
    _, classic = fetch(session.prometheus_url)
    code, output = promtool_check_metrics(classic)
    assert code == 0, output
    _, text = fetch(session.prometheus_url, accept=OPENMETRICS)
    families = {family.name for family in parse_openmetrics(text)}
    assert {"llm_custom_reward", "processing_time_seconds", "targets", "target"} <= families


def test_a_registered_metric_past_the_attribute_limit_logs_one_overflow_warning(harness, caplog):
    h = harness()
    otel_llm.register("llm.custom.per_prompt", "counter", attributes=["llm.custom.prompt"])
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        for index in range(SDK_CARDINALITY_LIMIT + 500):
            otel_llm.record("llm.custom.per_prompt", 1, {"llm.custom.prompt": f"p{index}"})
    warnings = [r.getMessage() for r in caplog.records if "llm.custom.per_prompt" in r.getMessage()]
    assert len(warnings) == 1 and OVERFLOW_ATTRIBUTE in warnings[0]
    points = h.collect().points["llm.custom.per_prompt"]
    overflow = [p for p in points if dict(p.attributes) == {OVERFLOW_ATTRIBUTE: True}]
    assert len(points) == SDK_CARDINALITY_LIMIT + 1 and len(overflow) == 1
    assert overflow[0].value == 500


# -- values handed to record() and record_kv_cache() ---------------------------------------------------------------

BAD_RECORDS = [  # (instrument, value, attributes, what the warning says)
    ("counter", -1.0, None, "cannot decrease"),
    ("histogram", -0.5, None, "values >= 0"),
    ("gauge", None, None, "NoneType"),
    ("gauge", "banana", None, "str"),
    ("counter", "4", None, "str"),
    ("histogram", [1.0], None, "list"),
    ("gauge", torch.ones(2), None, "shape (2,)"),
    ("gauge", 1.0, ["llm.custom.env"], "attributes must be a mapping"),
]


@pytest.mark.parametrize(("instrument", "value", "attributes", "said"), BAD_RECORDS,
                         ids=[f"{c[0]}-{type(c[1]).__name__}-{i}" for i, c in enumerate(BAD_RECORDS)])
def test_record_with_a_value_it_cannot_take_drops_it_with_one_warning_inside_the_loop(
        harness, caplog, instrument, value, attributes, said):
    model, optimizer = tiny()
    h = harness(model, optimizer, sampling_interval=1)
    otel_llm.register("llm.custom.value", instrument, attributes=["llm.custom.env"])
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        for _ in range(3):
            _, loss = model(idx, idx)
            loss.backward()
            otel_llm.record("llm.custom.value", value, attributes)
            optimizer.step()
            optimizer.zero_grad()
    warnings = [r.getMessage() for r in caplog.records if "llm.custom.value" in r.getMessage()]
    assert len(warnings) == 1 and said in warnings[0] and "dropped" in warnings[0]
    otel_llm.record("llm.custom.value", 2.0, {"llm.custom.env": "ok"})  # the metric itself still works
    metrics = h.collect()
    assert metrics.value("llm.train.steps") == 3
    (point,) = metrics.points["llm.custom.value"]
    assert dict(point.attributes) == {"llm.custom.env": "ok"}
    assert (point.sum, point.count) == (2.0, 1) if instrument == "histogram" else point.value == 2.0


@pytest.mark.parametrize(("reused", "added"), [(-1, 3), ("a", 1), (None, None), (1.5, 2), (torch.ones(2), 1)],
                         ids=["negative", "string", "none", "fraction", "tensor"])
def test_record_kv_cache_with_counts_it_cannot_take_drops_them_with_one_warning(harness, caplog, reused, added):
    h = harness()
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        h.session.record_kv_cache(reused, added)
        h.session.record_kv_cache(reused, added)
    assert sum("record_kv_cache() takes" in r.getMessage() for r in caplog.records) == 1
    h.session.record_kv_cache(torch.tensor(96), 32.0)
    metrics = h.collect()
    assert (metrics.value("llm.kv_cache.hits"), metrics.value("llm.kv_cache.lookups")) == (96, 128)


def test_adafactor_without_a_learning_rate_and_groups_added_mid_run_train_and_export(harness):
    """Hugging Face Adafactor's documented setup keeps lr=None in its param groups (step 0 used to raise)."""
    transformers = pytest.importorskip("transformers")
    model, _ = tiny()
    body = [p for name, p in model.named_parameters() if not name.startswith("lm_head")]
    optimizer = transformers.Adafactor(body, lr=None, relative_step=True, scale_parameter=True, warmup_init=True)
    h = harness(model, optimizer, sampling_interval=1)
    train(model, optimizer, 2)
    optimizer.add_param_group({"params": list(model.lm_head.parameters()), "lr": 0.01, "extra_key": "kept"})
    train(model, optimizer, 2)
    metrics = h.collect()
    assert metrics.value("llm.train.steps") == 4
    rates = {dict(p.attributes)["llm.param.group"]: p.value for p in metrics.points["llm.train.learning_rate"]}
    assert rates == {"1": 0.01}  # group 0 has no lr to report; the added group does
    assert metrics.value("llm.grad.norm") > 0
