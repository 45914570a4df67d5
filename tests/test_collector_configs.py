"""The shipped backend configurations are well formed.

No OpenTelemetry Collector binary is available on this machine, so the
Collector configuration is checked structurally (tests/support/otelcol.py).
The Prometheus configuration is checked by promtool itself.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.backends import require_binary
from tests.support.otelcol import check_collector_config

CONFIGS = Path(__file__).resolve().parents[1] / "collector_configs"
COLLECTOR_CONFIGS = sorted((CONFIGS / "otelcol").glob("*.yaml"))


def load(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path.name} is not a YAML mapping"
    return config


def test_there_is_a_collector_config():
    assert [p.name for p in COLLECTOR_CONFIGS] == ["otel-collector.yaml"]


@pytest.mark.parametrize("path", COLLECTOR_CONFIGS, ids=lambda p: p.name)
def test_collector_pipelines_reference_defined_contrib_components_and_use_them_all(path):
    check_collector_config(load(path))


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
