"""The demo job runs and exports what its docstring promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.backends import free_port
from tests.support.receivers import GrpcMetricsReceiver

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_train_exports_through_prometheus_and_otlp(tmp_path):
    port = free_port()
    with GrpcMetricsReceiver() as receiver:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update({"OTEL_EXPORTER_PROMETHEUS_PORT": str(port), "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.url,
                    "OTEL_EXPORTER_OTLP_METRICS_INSECURE": "true", "OTEL_METRIC_EXPORT_INTERVAL": "1000"})
        result = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), "--steps", "40"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"scrape http://127.0.0.1:{port}/metrics" in result.stdout
        steps = [p.value for p in receiver.points("llm.train.steps")]
        assert steps and steps[-1] == 40
        assert {"llm.grad.norm", "llm.loss.token", "llm.param.update_ratio"} <= receiver.metric_names()
