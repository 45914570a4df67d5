"""The operations kit against the real backends, fed by a real training run.

Prometheus scrapes otel_llm's endpoint and evaluates the generated rules; the
dashboard's queries run against it. VictoriaMetrics ingests the same session's
OTLP push under ``-opentelemetry.usePrometheusNaming``: it must store exactly
the series names the scrape shows (counter and histogram suffixes included),
and the values must agree series by series.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

import otel_llm
from otel_llm.catalog import ATTENTION_HEAD_ENTROPY, CATALOG, HEAD_ENTROPY_BUCKETS, MetricSpec, by_name, prometheus_name
from otel_llm.ops import dashboard, rules
from otel_llm.ops.promql import label, series_name
from tests.models import GPT
from tests.support.backends import Prometheus, VictoriaMetrics, http_get
from tests.support.grafana import queries
from tests.support.naming import HISTOGRAM_SUFFIXES, exposed_names, record_every_metric
from tests.support.scrape import fetch, series

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

VOCAB = 64


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* / torchrun variable of the outer environment leaks into a test."""
    for name in list(os.environ):
        if name.startswith("OTEL_") or name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name)


class Trainer:
    """A tiny nanoGPT-style model trained one step at a time under an otel_llm session."""

    def __init__(self, sessions: list[otel_llm.Instrumentation], **config: Any) -> None:
        torch.manual_seed(0)
        self.model = GPT(vocab=VOCAB)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.generator = torch.Generator().manual_seed(0)
        self.session = otel_llm.Instrumentation(self.model, self.optimizer, config=otel_llm.Config(
            sampling_interval=1, prometheus_port=0, **config))
        sessions.append(self.session)

    def step(self, steps: int = 1) -> None:
        for _ in range(steps):
            idx = torch.randint(0, VOCAB, (2, 16), generator=self.generator)
            _, loss = self.model(idx, idx)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()

    @property
    def target(self) -> str:
        url = self.session.prometheus_url
        assert url is not None
        return url.removeprefix("http://").removesuffix("/metrics")


def prometheus_config(target: str, rules_path: Path) -> str:
    return f"""\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{rules_path}"]
scrape_configs:
  - job_name: trainer
    static_configs:
      - targets: ["{target}"]
"""


def api(backend: Prometheus, path: str) -> Any:
    payload = json.loads(http_get(backend.url + path))
    assert payload["status"] == "success", payload
    return payload["data"]


def scrape_name(spec: MetricSpec) -> str:
    return prometheus_name(spec.name, spec.unit, spec.instrument)


def scrape_names(body: str) -> dict[str, MetricSpec]:
    """Catalog spec of every series name in a scrape that belongs to the catalog."""
    names: dict[str, MetricSpec] = {}
    for spec in CATALOG:
        base = scrape_name(spec)
        for suffix in HISTOGRAM_SUFFIXES if spec.instrument == "histogram" else ("",):
            names[base + suffix] = spec
    return {name: spec for name, spec in names.items() if re.search(rf"^{name}[{{ ]", body, re.M)}


def panel_spec(panel: dict[str, Any]) -> MetricSpec:
    """The catalog signal a panel shows (its title starts with the signal's name)."""
    return by_name(panel["title"].split()[0])


def wait_until(condition: Callable[[], bool], timeout: float, action: Callable[[], object] = lambda: None) -> bool:
    """Run ``action`` and poll ``condition`` until it holds; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        action()
        if condition():
            return True
        time.sleep(0.2)
    return False


def median_from_buckets(buckets: dict[float, float]) -> float:
    """The Prometheus histogram_quantile(0.5) of cumulative bucket counts, computed here independently."""
    bounds = sorted(buckets)
    rank = 0.5 * buckets[math.inf]
    below, lower = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        below, lower = count, bound
    raise AssertionError("empty histogram")


# -- Prometheus ------------------------------------------------------------------------


def test_prometheus_evaluates_the_rules_and_dashboard_queries_on_a_training_run(sessions, tmp_path):
    trainer = Trainer(sessions, exporters="prometheus")
    trainer.session.register("llm.custom.reward", "gauge")
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(rules.render())
    poisoned: list[bool] = []

    def train() -> None:
        trainer.step()
        trainer.session.record_kv_cache(reused=96, added=32)
        if not poisoned and "llm_train_steps_total" in prometheus.metric_names():
            # one NaN once the run is being scraped: the nonfinite series appears mid-run, at 1
            trainer.session.record("llm.custom.reward", float("nan"))
            poisoned.append(True)

    def firing() -> list[dict[str, Any]]:
        return [a for a in api(prometheus, "/api/v1/alerts")["alerts"] if a["state"] == "firing"]

    def evaluated() -> bool:
        (group,) = api(prometheus, "/api/v1/rules")["groups"]
        return all(rule["health"] != "unknown" for rule in group["rules"])

    kv_ratio = ("sum by (job, llm_rank) (rate(llm_kv_cache_hits_total[1m]))"
                " / sum by (job, llm_rank) (rate(llm_kv_cache_lookups_total[1m]))")
    with Prometheus(prometheus_config(trainer.target, rules_path)) as prometheus:
        nonfinite_rate = "count_over_time(llm_telemetry_nonfinite_total[1m]) >= 2"  # rate() needs two samples
        ready = wait_until(lambda: bool(firing()) and bool(prometheus.query(kv_ratio)) and evaluated()
                           and bool(prometheus.query(nonfinite_rate)), timeout=25, action=train)
        assert ready, prometheus.log_tail()

        (group,) = api(prometheus, "/api/v1/rules")["groups"]
        assert group["name"] == "otel-llm"
        assert len(group["rules"]) == len(rules.alerts()) + len(rules.recording_rules()) + len(rules.rank_aggregates())
        for rule in group["rules"]:
            assert (rule["health"], rule.get("lastError", "")) == ("ok", ""), rule["name"]
        layers = {str(i) for i in range(len(trainer.model.transformer.h))}
        for record in ("job_llm_layer:llm_attention_logit_max:max", "job_llm_layer:llm_activation_sparsity:median"):
            assert {r["metric"]["llm_layer"] for r in prometheus.query(record)} == layers, record

        (alert,) = firing()  # a healthy run trips nothing else
        assert alert["labels"]["alertname"] == "LlmTelemetryNonfiniteIncreasing"
        assert {k: alert["labels"][k] for k in ("severity", "job", "llm_rank", "llm_signal")} == {
            "severity": "warning", "job": "trainer", "llm_rank": "0", "llm_signal": "llm.custom.reward"}
        assert alert["annotations"]["summary"] == "A signal went NaN/Inf on rank 0, signal llm.custom.reward"

        (ratio,) = prometheus.query(kv_ratio)
        assert float(ratio["value"][1]) == pytest.approx(0.75, rel=1e-12)

        stored = prometheus.metric_names()
        board = dashboard.dashboard()
        answered = 0
        for query in queries(board, layer="0"):
            result = prometheus.query(query.expr)  # raises on a query Prometheus rejects
            name = series_name(panel_spec(query.panel))
            if name in stored or name + "_bucket" in stored:
                assert result, f"{query.panel['title']} {query.ref}: no data for {query.expr}"
                answered += 1
        assert answered >= 25
        (target_b,) = [q for q in queries(board) if q.panel["title"] == "llm.kv_cache.hit_ratio (#16)" and q.ref == "B"]
        (ratio,) = prometheus.query(target_b.expr)
        assert float(ratio["value"][1]) == pytest.approx(0.75, rel=1e-12)


def test_attention_entropy_quantile_query(sessions, tmp_path):
    """The per-layer median of head entropy: every decoder layer, the value Prometheus computes from the buckets."""
    trainer = Trainer(sessions, exporters="prometheus")
    layers = {str(i) for i in range(len(trainer.model.transformer.h))}
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(rules.render())
    bucket = series_name(by_name(ATTENTION_HEAD_ENTROPY)) + "_bucket"
    trainer.step(2)
    assert trainer.session.flush(5.0)
    assert re.search(rf"^{bucket}{{", fetch(trainer.session.prometheus_url)[1], re.M), f"{bucket} is not exported"

    (record,) = [r["record"] for r in rules.recording_rules()]
    with Prometheus(prometheus_config(trainer.target, rules_path)) as prometheus:
        def recorded_every_layer() -> bool:
            return {r["metric"].get("llm_layer") for r in prometheus.query(record)} == layers

        assert wait_until(recorded_every_layer, timeout=25, action=trainer.step), prometheus.log_tail()
        assert trainer.session.flush(5.0)
        body = fetch(trainer.session.prometheus_url)[1]
        final = {(labels["llm_layer"], labels["le"]): value for name, labels, value in series(body)
                 if name == bucket}
        total = f'sum by (llm_layer) ({bucket}{{le="+Inf"}})'

        def caught_up() -> bool:
            return {r["metric"]["llm_layer"]: float(r["value"][1]) for r in prometheus.query(total)} == {
                layer: final[layer, "+Inf"] for layer in layers}

        assert wait_until(caught_up, timeout=5), "Prometheus did not scrape the final counts"
        medians = prometheus.query(f"histogram_quantile(0.5, sum by (le, llm_layer, llm_rank) ({bucket}))")
        assert {r["metric"]["llm_layer"] for r in medians} == layers
        for result in medians:
            layer = result["metric"]["llm_layer"]
            buckets = {float(le): count for (lay, le), count in final.items() if lay == layer}
            assert float(result["value"][1]) == pytest.approx(median_from_buckets(buckets), rel=1e-9)

        for result in prometheus.query(record):
            assert {k: result["metric"][k] for k in ("job", "llm_rank")} == {"job": "trainer", "llm_rank": "0"}
            assert 0 < float(result["value"][1]) <= HEAD_ENTROPY_BUCKETS[-1]


# -- VictoriaMetrics ------------------------------------------------------------------


@pytest.fixture(scope="module")
def victoria_metrics() -> Iterator[VictoriaMetrics]:
    with VictoriaMetrics() as vm:
        yield vm


def test_victoria_metrics_stores_every_catalog_metric_under_its_scrape_name(victoria_metrics):
    """Every catalog instrument pushed through the plain SDK lands under the name otel_llm's endpoint gives it."""
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=victoria_metrics.otlp_http_endpoint),
                                           export_interval_millis=60_000)
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "naming"}))
    record_every_metric(provider.get_meter("naming"), CATALOG, {})
    assert provider.force_flush(10_000)
    provider.shutdown()

    stored = {r["metric"]["__name__"] for r in victoria_metrics.query('{service_name="naming"}')}
    assert stored == exposed_names(CATALOG)
    assert {"llm_grad_norm", "llm_train_loss", "llm_memory_pressure", "llm_kv_cache_hit_ratio"} <= stored
    assert not {name for name in stored if name.endswith("_ratio")} - {
        series_name(s) for s in CATALOG if s.name.endswith("ratio")}


def test_victoria_metrics_values_agree_with_the_scrape(victoria_metrics, sessions, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", victoria_metrics.otlp_http_endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "gzip")
    trainer = Trainer(sessions, exporters="prometheus,otlp", service_name="agree")
    trainer.session.register("llm.custom.reward", "gauge")  # a user gauge with the default unit keeps its name too
    trainer.session.record("llm.custom.reward", float("nan"))
    for _ in range(2):  # two pushes, so rate() has two samples per series
        trainer.step(3)
        trainer.session.record_kv_cache(reused=96, added=32)
        trainer.session.record("llm.custom.reward", 0.7)
        assert trainer.session.flush(5.0)
        time.sleep(1.0)
    body = fetch(trainer.session.prometheus_url)[1]
    names = scrape_names(body)
    assert {"llm_train_loss", "llm_kv_cache_hit_ratio", "llm_telemetry_nonfinite_total",
            "llm_loss_token_bucket"} <= set(names)

    scraped = {name for name, _, _ in series(body) if name.startswith("llm_")}
    stored_names = {r["metric"]["__name__"] for r in victoria_metrics.query('{service_name="agree"}')}
    assert stored_names == scraped, (sorted(stored_names - scraped), sorted(scraped - stored_names))
    assert {"llm_custom_reward", "llm_grad_norm", "llm_train_step_duration_seconds_bucket",
            "llm_train_steps_total"} <= stored_names

    compared = 0
    for name, spec in names.items():
        stored = victoria_metrics.query(f'{name}{{service_name="agree"}}')
        keys = ["llm_rank", "llm_world_size", *map(label, spec.attributes)]
        for _, labels, value in (s for s in series(body) if s[0] == name):
            (match,) = [r for r in stored if all(r["metric"].get(k) == labels.get(k) for k in keys)
                        and ("le" not in labels or float(r["metric"]["le"]) == float(labels["le"]))]
            # VictoriaMetrics answers with 12 significant digits
            assert float(match["value"][1]) == pytest.approx(value, rel=1e-11), f"{name} {labels}"
            compared += 1
    assert compared >= 50

    board = dashboard.dashboard()
    (ratio,) = [q for q in queries(board, rate_interval="5m", rank="0")
                if q.panel["title"] == "llm.kv_cache.hit_ratio (#16)" and q.ref == "B"]
    (result,) = victoria_metrics.query(ratio.expr)
    assert float(result["value"][1]) == pytest.approx(0.75, rel=1e-11)
    answered = 0
    for query in queries(board, rate_interval="5m", rank="0", layer="0"):
        result = victoria_metrics.query(query.expr)
        if scrape_name(panel_spec(query.panel)) in {name.removesuffix("_bucket") for name in names}:
            assert result, f"{query.panel['title']} {query.ref}: no data for {query.expr}"
            answered += 1
    assert answered >= 25
