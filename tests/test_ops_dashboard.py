"""The generated Grafana dashboard: a panel per catalog signal in its unit, valid PromQL, a sound layout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from otel_llm.catalog import CATALOG, MetricSpec
from otel_llm.ops.dashboard import dashboard
from otel_llm.ops.promql import series_name
from tests.support.backends import require_binary
from tests.support.grafana import queries

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "collector_configs/grafana/otel-llm-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana unit ids; counters are drawn as per-second rates.
UNITS = {
    "llm.train.steps": "count:steps/s", "llm.train.skipped_steps": "count:steps/s",
    "llm.grad.clipped_steps": "count:steps/s", "llm.train.tokens": "count:tokens/s",
    "llm.train.step.duration": "s", "llm.telemetry.overhead": "s",
    "llm.rope.angle_deviation": "radian",
    "llm.kv_cache.hits": "count:tokens/s", "llm.kv_cache.lookups": "count:tokens/s",
    "llm.telemetry.sampled_steps": "count:steps/s", "llm.telemetry.sampling_interval": "count:steps",
    "llm.telemetry.nonfinite": "count:events/s", "llm.anomaly.events": "count:events/s",
    "llm.train.flops": "flops", "llm.train.input_wait.duration": "s", "llm.train.compute.duration": "s",
    "llm.train.checkpoint.duration": "s", "llm.train.last_step.timestamp": "s", "llm.train.step.slowest": "s",
    "llm.train.step.fastest": "s", "llm.memory.peak_allocated": "bytes", "llm.memory.peak_reserved": "bytes",
    "llm.guard.actions": "count:actions/s",
}


def panels_of(board: dict[str, Any], spec: MetricSpec) -> list[dict[str, Any]]:
    pattern = re.compile(rf"\b{re.escape(series_name(spec))}(_bucket)?\{{")
    return [p for p in board["panels"] if any(pattern.search(t["expr"]) for t in p.get("targets", ()))
            and p["title"].startswith(spec.name)]


def by_title(board: dict[str, Any], title: str) -> dict[str, Any]:
    (panel,) = [p for p in board["panels"] if p["title"] == title]
    return panel


def variable(board: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in board["templating"]["list"] if v["name"] == name]
    return found


def test_dashboard_is_a_grafana_39_model_with_datasource_job_rank_and_layer_variables():
    board = dashboard()
    assert board["schemaVersion"] == 39
    assert board["uid"] == "otel-llm-training"
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "job", "rank", "layer"]
    datasource = variable(board, "datasource")
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    rank = variable(board, "rank")
    assert rank["query"] == 'label_values(llm_train_steps_total{job=~"$job"}, llm_rank)'
    assert rank["includeAll"] and rank["multi"] and rank["allValue"] == ".*"
    assert variable(board, "layer")["query"] == (
        'label_values(llm_attention_head_entropy_bucket{job=~"$job", llm_rank=~"$rank"}, llm_layer)')
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == DATASOURCE
            assert panel["targets"] and all(t["datasource"] == DATASOURCE for t in panel["targets"])
            assert all('llm_rank=~"$rank"' in t["expr"] for t in panel["targets"]), panel["title"]


def test_every_catalog_signal_has_a_panel_in_its_unit():
    board = dashboard()
    for spec in CATALOG:
        panels = panels_of(board, spec)
        assert panels, f"no panel for {spec.name}"
        expected = UNITS.get(spec.name, "none")
        for panel in panels:
            if panel["type"] == "heatmap":
                assert panel["options"]["yAxis"]["unit"] == expected
            else:
                assert panel["fieldConfig"]["defaults"]["unit"] == expected, spec.name


def test_head_entropy_has_a_heatmap_per_layer_and_its_median_per_layer_against_the_threshold():
    board = dashboard()
    heatmap = by_title(board, "llm.attention.head_entropy (#8) layer $layer")
    assert heatmap["type"] == "heatmap"
    assert (heatmap["repeat"], heatmap["repeatDirection"]) == ("layer", "h")
    (target,) = heatmap["targets"]
    assert target["format"] == "heatmap"
    assert target["expr"] == ('sum by (le) (increase(llm_attention_head_entropy_bucket{job=~"$job", '
                              'llm_rank=~"$rank", llm_layer=~"$layer"}[$__rate_interval]))')
    median = by_title(board, "llm.attention.head_entropy (#8) p50 per layer")
    (target,) = median["targets"]
    assert target["expr"] == ('histogram_quantile(0.5, sum by (job, llm_rank, llm_layer, le) (rate('
                              'llm_attention_head_entropy_bucket{job=~"$job", llm_rank=~"$rank"}[$__rate_interval])))')
    assert median["fieldConfig"]["defaults"]["thresholds"]["steps"] == [
        {"color": "green", "value": None}, {"color": "orange", "value": 1.8}]


def test_kv_hit_ratio_panel_divides_the_counter_rates_beside_the_window_gauge():
    panel = by_title(dashboard(), "llm.kv_cache.hit_ratio (#16)")
    exprs = {t["refId"]: t["expr"] for t in panel["targets"]}
    assert exprs == {
        "A": 'llm_kv_cache_hit_ratio{job=~"$job", llm_rank=~"$rank"}',
        "B": 'sum by (job, llm_rank) (rate(llm_kv_cache_hits_total{job=~"$job", llm_rank=~"$rank"}[$__rate_interval]))'
             ' / sum by (job, llm_rank) (rate(llm_kv_cache_lookups_total{job=~"$job", llm_rank=~"$rank"}'
             '[$__rate_interval]))',
    }


def test_threshold_bands_are_coloured_by_the_worst_severity_that_holds():
    board = dashboard()

    def steps(title: str) -> list[tuple[str, float | None]]:
        defaults = by_title(board, title)["fieldConfig"]["defaults"]
        return [(s["color"], s["value"]) for s in defaults["thresholds"]["steps"]]

    assert steps("llm.memory.pressure (#17)") == [("green", None), ("orange", 0.85), ("red", 0.95)]
    assert steps("llm.grad.norm_decay_rate (#1)") == [("orange", None), ("green", -0.1), ("orange", 0.85)]
    assert steps("llm.kv_cache.hit_ratio (#16)") == [("orange", None), ("green", 0.6)]
    assert steps("llm.param.update_variance_ratio (#4)") == [("green", None), ("orange", 1e-5), ("red", 1e-3)]
    assert steps("llm.grad.norm") == [("green", None)]
    assert by_title(board, "llm.grad.norm")["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "off"


def test_panels_tile_the_grid_without_overlap_and_ids_are_unique():
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_panel_query_is_valid_promql(tmp_path):
    """promtool parses each query (variables filled in) as the expression of a recording rule."""
    board = dashboard()
    exprs = [q.expr for q in queries(board, layer="0")]
    assert len(exprs) == sum(len(p.get("targets", ())) for p in board["panels"])
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query:{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}))
    result = subprocess.run([str(require_binary("promtool")), "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_checked_in_dashboard_matches_the_cli():
    printed = subprocess.run([sys.executable, "-m", "otel_llm.cli", "dashboard"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert CHECKED_IN.read_text() == printed, (
        f"{CHECKED_IN.relative_to(ROOT)} is stale: run `otel-llm dashboard > {CHECKED_IN.relative_to(ROOT)}`")
    assert json.loads(printed) == dashboard()
