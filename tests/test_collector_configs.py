"""The shipped backend configurations are well formed.

No OpenTelemetry Collector binary is available on this machine, so the
Collector configuration is checked structurally: it parses, every pipeline
references components that are defined, every defined component is used, and
each component type is one that the otelcol-contrib distribution ships (the
list below). The Prometheus configuration is checked by promtool itself.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.backends import require_binary

CONFIGS = Path(__file__).resolve().parents[1] / "collector_configs"
COLLECTOR_CONFIGS = sorted((CONFIGS / "otelcol").glob("*.yaml"))
SECTIONS = ("receivers", "processors", "exporters", "connectors", "extensions")
# Component types of otelcol-contrib, per kind (a subset: the ones a metrics deployment may use).
CONTRIB = {
    "receivers": {"otlp", "prometheus", "hostmetrics", "kubeletstats", "k8s_cluster", "filelog",
                  "prometheus_simple", "statsd", "influxdb", "carbon", "jaeger", "zipkin"},
    "processors": {"batch", "memory_limiter", "resource", "resourcedetection", "attributes", "filter",
                   "transform", "metricstransform", "cumulativetodelta", "deltatocumulative", "groupbyattrs",
                   "k8sattributes", "probabilistic_sampler", "tail_sampling", "interval"},
    "exporters": {"otlp", "otlphttp", "prometheus", "prometheusremotewrite", "debug", "file", "loadbalancing",
                  "kafka", "awsemf", "googlecloud", "datadog", "influxdb", "clickhouse"},
    "connectors": {"forward", "count", "spanmetrics", "routing"},
    "extensions": {"health_check", "pprof", "zpages", "basicauth", "bearertokenauth", "oauth2client",
                   "file_storage"},
}
PIPELINE_KINDS = ("receivers", "processors", "exporters")


def load(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path.name} is not a YAML mapping"
    return config


def component_type(component_id: str) -> str:
    """``otlphttp/victoriametrics`` -> ``otlphttp``."""
    return component_id.split("/", 1)[0]


def test_there_is_a_collector_config():
    assert [p.name for p in COLLECTOR_CONFIGS] == ["otel-collector.yaml"]


@pytest.mark.parametrize("path", COLLECTOR_CONFIGS, ids=lambda p: p.name)
def test_collector_pipelines_reference_defined_contrib_components_and_use_them_all(path):
    config = load(path)
    assert set(config) <= {*SECTIONS, "service"}
    pipelines = config["service"]["pipelines"]
    assert pipelines, "no pipelines"
    used: dict[str, set[str]] = {kind: set() for kind in SECTIONS}
    for name, pipeline in pipelines.items():
        assert component_type(name) in ("metrics", "traces", "logs"), name
        assert set(pipeline) <= set(PIPELINE_KINDS), name
        assert pipeline.get("receivers") and pipeline.get("exporters"), f"{name} needs receivers and exporters"
        for kind in PIPELINE_KINDS:
            for component_id in pipeline.get(kind, ()):
                assert component_id in (config.get(kind) or {}), f"{name} uses undefined {kind[:-1]} {component_id}"
                used[kind].add(component_id)
    used["extensions"] = set(config["service"].get("extensions", ()))
    for extension in used["extensions"]:
        assert extension in (config.get("extensions") or {}), f"undefined extension {extension}"
    for kind in SECTIONS:
        defined = set(config.get(kind) or {})
        assert defined == used[kind], f"{kind} defined but unused: {sorted(defined - used[kind])}"
        for component_id in defined:
            assert component_type(component_id) in CONTRIB[kind], f"{component_id}: not an otelcol-contrib type"


def test_collector_turns_the_rank_resource_attributes_into_labels():
    """The rules and dashboard group by llm_rank; the prometheus exporter only has it with this setting."""
    config = load(CONFIGS / "otelcol" / "otel-collector.yaml")
    assert config["exporters"]["prometheus"]["resource_to_telemetry_conversion"] == {"enabled": True}
    assert config["exporters"]["otlphttp/victoriametrics"]["metrics_endpoint"].endswith("/opentelemetry/v1/metrics")
    (pipeline,) = config["service"]["pipelines"].values()
    assert pipeline["processors"][0] == "memory_limiter", "memory_limiter must run first"


def test_prometheus_config_and_its_rules_pass_promtool():
    result = subprocess.run([str(require_binary("promtool")), "check", "config",
                             str(CONFIGS / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert load(CONFIGS / "prometheus" / "prometheus.yml")["rule_files"] == ["rules.yml"]
