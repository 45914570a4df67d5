"""``otel-llm plan`` counts the series a real training run of the same shape exports, metric by metric.

A tiny Llama (2 layers, 4 heads; with and without LoRA, with one signal family
disabled) trains a few steps with clipping under a session that serves the
scrape endpoint and pushes OTLP/HTTP to an in-test receiver; the series of the
scrape and the data-point streams of the last push are counted here and must
equal the plan's per-rank rows and totals.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

import otel_llm
from otel_llm.catalog import CATALOG
from otel_llm.config import Config
from otel_llm.ops.plan import RUNTIME_SERIES, SCALE_RANKS, SCALE_SHAPES, Shape, plan, scale_table
from otel_llm.ops.promql import series_name
from tests.models import tiny_llama, tiny_lora_llama
from tests.support.naming import series_names
from tests.support.receivers import HttpMetricsReceiver, metric_points
from tests.support.scrape import fetch, series

pytestmark = pytest.mark.timeout(120)

LAYERS, HEADS = 2, 4


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_") or name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name)


def train(session_config: otel_llm.Config, lora: bool, sessions: list[otel_llm.Instrumentation]) -> str:
    """Three clipped AdamW steps with two param groups; the scrape after the last push."""
    model = tiny_lora_llama() if lora else tiny_llama()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trainable[::2]}, {"params": trainable[1::2], "weight_decay": 0.0}],
                                  lr=1e-3)
    session = otel_llm.Instrumentation(model, optimizer, config=session_config)
    sessions.append(session)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1e-3)  # every step clips: llm.grad.clipped_steps exists
        optimizer.step()
        optimizer.zero_grad()
    assert session.flush(5.0)
    assert session.prometheus_url is not None
    return fetch(session.prometheus_url)[1]


@pytest.mark.parametrize("lora, disabled", [(False, ()), (True, ("llm.activation.*",))], ids=["plain", "lora"])
def test_plan_equals_the_series_a_run_of_that_shape_exports(sessions, monkeypatch, lora, disabled):
    with HttpMetricsReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", receiver.endpoint)
        config = otel_llm.Config(sampling_interval=1, prometheus_port=0, exporters="prometheus,otlp",
                                 disabled_signals=disabled)
        body = train(config, lora, sessions)
        last_push = receiver.requests[-1]
    expected = plan(Shape(LAYERS, HEADS, ranks=1, lora=lora, param_groups=2),
                    Config(export_ranks="all", disabled_signals=disabled))

    scraped = Counter(name for name, _, _ in series(body))
    streams = Counter(m.name for rm in last_push.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                      for _ in metric_points(m))
    for row in expected.rows:
        names = series_names(row.spec, series_name(row.spec))
        assert (sum(scraped[n] for n in names), streams[row.spec.name]) == (row.scrape, row.otlp), row.spec.name
    assert scraped["target_info"] == 1
    assert sum(n for name, n in scraped.items() if name.startswith(("process_", "python_"))) == RUNTIME_SERIES
    assert sum(scraped.values()) == expected.scrape_per_rank
    assert sum(streams.values()) == expected.otlp_per_rank
    assert set(streams) <= {spec.name for spec in CATALOG}


def test_totals_scale_with_the_exporting_ranks_and_per_layer_signals_with_layers():
    small, large = (plan(Shape(layers, HEADS, ranks=256), Config(export_ranks="all", disabled_signals=()))
                    for layers in (2, 3))
    per_layer = {row.spec.name: (row.scrape, row.otlp) for row in large.rows}
    for row in small.rows:
        grows = "llm.layer" in row.spec.attributes
        scrape, otlp = per_layer[row.spec.name]
        assert (scrape - row.scrape, otlp - row.otlp) == ((row.scrape // 2, row.otlp // 2) if grows else (0, 0))
    assert small.scrape_total == small.scrape_per_rank * 256
    zero = plan(Shape(2, HEADS, ranks=256), Config(export_ranks="zero", disabled_signals=()))
    assert (zero.scrape_total, zero.otlp_total) == (small.scrape_per_rank, small.otlp_per_rank)


def test_cli_prints_the_rows_and_totals_and_what_reduces_them():
    printed = subprocess.run([sys.executable, "-m", "otel_llm.cli", "plan", "--layers", "80", "--heads", "64",
                              "--ranks", "1024"], capture_output=True, text=True, check=True, timeout=60).stdout
    expected = plan(Shape(80, 64, 1024), Config(export_ranks="all", disabled_signals=()))
    (total,) = [line.split() for line in printed.splitlines() if line.startswith("total ")]
    assert total == ["total", f"{expected.scrape_per_rank:,}", f"{expected.otlp_per_rank:,}",
                     f"{expected.scrape_total:,}", f"{expected.otlp_total:,}"]
    assert "llm_attention_head_entropy" in printed and "--export-ranks zero" in printed
    assert "disabling llm.attention.*" in printed
    bad = subprocess.run([sys.executable, "-m", "otel_llm.cli", "plan", "--layers", "0", "--heads", "1",
                          "--ranks", "1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "layers must be at least 1" in bad.stderr


def test_scale_table_covers_the_three_shapes_on_three_world_sizes():
    lines = scale_table().splitlines()[2:]
    assert len(lines) == len(SCALE_SHAPES) * len(SCALE_RANKS)
    for line, (model, layers, heads, ranks) in zip(lines, [(*s, r) for s in SCALE_SHAPES for r in SCALE_RANKS]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [model, str(layers), f"{ranks:,}"]
        assert cells[3] == f"{plan(Shape(layers, heads, ranks), Config(export_ranks='all')).scrape_total:,}"
