"""Structural checks of an OpenTelemetry Collector configuration (no Collector binary runs on this machine).

A config parses, every pipeline references components that are defined, every
defined component is used, and each component type is one that the
otelcol-contrib distribution ships (the list below).
"""

from __future__ import annotations

from typing import Any

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


def component_type(component_id: str) -> str:
    """``otlphttp/victoriametrics`` -> ``otlphttp``."""
    return component_id.split("/", 1)[0]


def check_collector_config(config: Any) -> None:
    """Raise AssertionError naming what is wrong with a parsed Collector configuration."""
    assert isinstance(config, dict), "a Collector configuration is a YAML mapping"
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
    processors = next(iter(pipelines.values())).get("processors", [])
    assert not processors or processors[0] == "memory_limiter", "memory_limiter must run first"
