"""Every example runs offline, prints where to look and exports what its docstring promises.

Each example runs as a subprocess with both readers on: Prometheus on a free port
and OTLP/gRPC into an in-test receiver. The series its docstring names (``llm_*``
Prometheus names, labels aside) must all arrive over OTLP, and a few values per
example are checked against what the example did.
"""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from otel_llm.catalog import (
    ATTR_DEVICE,
    ATTR_GUARD_ACTION,
    ATTR_LAYER,
    ATTR_PARAM_GROUP,
    ATTR_SIGNAL,
    CATALOG,
    prometheus_name,
)
from tests.support.backends import free_port
from tests.support.receivers import GrpcMetricsReceiver

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LABELS = {name.replace(".", "_")
          for name in (ATTR_DEVICE, ATTR_GUARD_ACTION, ATTR_LAYER, ATTR_PARAM_GROUP, ATTR_SIGNAL)}
KV_LAYERS, KV_REQUESTS, KV_PREFIX, KV_QUESTION, KV_NEW = 2, 12, 48, 8, 8


def series_names() -> dict[str, str]:
    """Prometheus series name -> OTel metric name, histograms' _bucket/_count/_sum included."""
    names = {}
    for spec in CATALOG:
        series = prometheus_name(spec.name, spec.unit, spec.instrument)
        names[series] = spec.name
        if spec.instrument == "histogram":
            names.update({series + suffix: spec.name for suffix in ("_bucket", "_count", "_sum")})
    return names


def promised(script: Path) -> set[str]:
    """OTel names of the series the script's docstring names; an unknown ``llm_*`` word fails."""
    docstring = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    known = series_names()
    words = set(re.findall(r"\bllm_[a-z0-9_]+", docstring)) - LABELS
    unknown = words - known.keys()
    assert not unknown, f"{script.name} names series otel_llm does not export: {sorted(unknown)}"
    return {known[word] for word in words}


def last(receiver: GrpcMetricsReceiver, name: str, **attributes: str) -> float:
    wanted = {k.replace("_", "."): v for k, v in attributes.items()}
    values = [p.value for p in receiver.points(name) if p.attributes == wanted]
    assert values, f"no {name}{wanted} arrived"
    return values[-1]


def kv_cache_counts(receiver: GrpcMetricsReceiver) -> None:
    # per layer: the prefix prefill adds 48; each request reuses the prefix (48, adds the 8-token
    # question) and then decodes 7 tokens, reusing 56 + i entries and adding 1 each time
    decode = range(KV_PREFIX + KV_QUESTION, KV_PREFIX + KV_QUESTION + KV_NEW - 1)
    hits = KV_LAYERS * KV_REQUESTS * (KV_PREFIX + sum(decode))
    lookups = KV_LAYERS * (KV_PREFIX + KV_REQUESTS * (KV_PREFIX + KV_QUESTION + sum(d + 1 for d in decode)))
    assert last(receiver, "llm.kv_cache.hits") == hits
    assert last(receiver, "llm.kv_cache.lookups") == lookups


def lora_groups(receiver: GrpcMetricsReceiver) -> None:
    for group in ("all", "lora_a", "lora_b"):
        assert 0 <= last(receiver, "llm.grad.sparsity", llm_param_group=group) <= 1
    for layer in ("0", "1"):
        assert 0 < last(receiver, "llm.lora.rank_activation_ratio", llm_layer=layer) <= 1


def gradient_anomalies(receiver: GrpcMetricsReceiver) -> None:
    assert last(receiver, "llm.anomaly.events", llm_signal="llm.grad.norm") >= 1
    intervals = [p.value for p in receiver.points("llm.telemetry.sampling_interval")]
    assert max(intervals) > 10  # it grew; the drop back is timed by tests/test_adaptive_end_to_end.py


def guard_damps_the_blow_up(receiver: GrpcMetricsReceiver) -> None:
    assert last(receiver, "llm.guard.actions", llm_guard_action="clip_on_rebound") == 1
    norms = [p.value for p in receiver.points("llm.grad.norm")]
    assert all(math.isfinite(n) for n in norms)


@dataclass(frozen=True)
class Example:
    script: str
    args: tuple[str, ...] = ()
    steps: int | None = None
    zero_code: bool = False
    check: Callable[[GrpcMetricsReceiver], None] | None = None


EXAMPLES = [
    Example("train.py", ("--steps", "40"), steps=40),
    Example("zero_code/train.py", ("--steps", "30"), steps=30, zero_code=True),
    Example("hf_trainer_lora.py", steps=16, check=lora_groups),
    Example("lightning_train.py", steps=16),
    Example("generate_kv_cache.py", check=kv_cache_counts),
    Example("anomaly_lr_blowup.py", ("--steps", "260", "--blow-up-at", "180"), steps=260, check=gradient_anomalies),
    Example("guards.py", steps=60, check=guard_damps_the_blow_up),
]


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.script for e in EXAMPLES])
def test_example_runs_and_exports_what_it_promises(tmp_path, example):
    script = ROOT / "examples" / example.script
    wanted = promised(script)
    assert wanted, f"{example.script}'s docstring names no series"
    port = free_port()
    with GrpcMetricsReceiver() as receiver:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "PYTHONPATH"}
        env.update({"OTEL_EXPORTER_PROMETHEUS_PORT": str(port), "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.url,
                    "OTEL_EXPORTER_OTLP_METRICS_INSECURE": "true", "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                    "HF_HUB_OFFLINE": "1"})
        command = [sys.executable, str(script), *example.args]
        if example.zero_code:
            env["OTEL_METRICS_EXPORTER"] = "prometheus,otlp"  # the exact command of examples/zero_code/README.md
            command = [str(VENV_BIN / "opentelemetry-instrument"), *command]
        started = time.monotonic()
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr[-3000:]
        assert elapsed < 60, f"{example.script} took {elapsed:.0f} s"
        assert f"scrape http://127.0.0.1:{port}/metrics" in result.stdout
        assert "otel_llm: try PromQL" in result.stdout
        missing = wanted - receiver.metric_names()
        assert not missing, f"{example.script} promised but did not export {sorted(missing)}"
        if example.steps is not None:
            assert last(receiver, "llm.train.steps") == example.steps
        if example.check is not None:
            example.check(receiver)
    assert list(tmp_path.iterdir()) == []  # nothing written to the working directory


def test_zero_code_readme_gives_the_command_the_test_runs():
    readme = (ROOT / "examples" / "zero_code" / "README.md").read_text(encoding="utf-8")
    assert "OTEL_METRICS_EXPORTER=prometheus,otlp opentelemetry-instrument python examples/zero_code/train.py\n" \
        in readme
    assert "import otel_llm" not in (ROOT / "examples" / "zero_code" / "train.py").read_text(encoding="utf-8")
