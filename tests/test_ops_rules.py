"""The generated Prometheus rules: every catalog threshold fires beyond its bound and stays quiet inside it.

``promtool test rules`` evaluates the generated file on synthetic series built
here from each threshold (its operator, bound and hold time); the expected
alerts come from evaluating the threshold in Python, not from the generator.
"""

from __future__ import annotations

import operator
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_llm.catalog import CATALOG, MEMORY_PRESSURE, MetricSpec, Threshold, by_name
from otel_llm.ops import rules
from otel_llm.ops.promql import parse_statistic, series_name
from otel_llm.ops.runbooks import RUNBOOKS
from tests.support.backends import require_binary

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "collector_configs/prometheus/rules.yml"
EXPECTED_FOR = {"warning": "5m", "critical": "1m"}  # the defaults the README documents
OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
PROCESS = {"job": "trainer", "llm_rank": "0", "llm_world_size": "1"}
ATTRIBUTE_VALUES = {"llm.layer": "3", "llm.device": "cuda:1", "llm.param.group": "all", "llm.signal": "llm.grad.norm",
                    "llm.guard.action": "lr_backoff"}
SAMPLES = 21  # one per minute, 0m..20m
VALUE = '{{ $value | printf "%.4g" }}'


def minutes(duration: str) -> int:
    assert re.fullmatch(r"\d+m", duration), duration
    return int(duration[:-1])


def series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{key}="{value}"' for key, value in labels.items()) + "}"


def render(template: str, labels: dict[str, str], value: float | None) -> str:
    """What Prometheus makes of an annotation template (only the constructs the rules may use)."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    if value is not None:
        text = text.replace(VALUE, format(value, ".4g"))
    assert "{{" not in text, f"unexpected template construct in {template!r}"
    return text


def expected_alert(alert: rules.Alert, labels: dict[str, str], value: float | None) -> dict[str, Any]:
    rule = alert.rule()
    exp_labels = {**labels, "severity": alert.threshold.severity}
    return {"exp_labels": exp_labels,
            "exp_annotations": {key: render(text, exp_labels, value) for key, text in rule["annotations"].items()}}


def hold(threshold: Threshold) -> int:
    return minutes(threshold.for_duration or EXPECTED_FOR[threshold.severity])


def attribute_labels(spec: MetricSpec) -> dict[str, str]:
    return {a.replace(".", "_"): ATTRIBUTE_VALUES[a] for a in spec.attributes}


def alert_tests(spec_alerts: list[rules.Alert], expect, times: set[int]) -> list[dict[str, Any]]:
    """One alert_rule_test per alert name and time; ``expect(alert, t)`` lists what fires."""
    tests = []
    for name in dict.fromkeys(a.name for a in spec_alerts):
        for t in sorted(times):
            fired = [e for a in spec_alerts if a.name == name for e in expect(a, t)]
            tests.append({"eval_time": f"{t}m", "alertname": name, "exp_alerts": fired})
    return tests


def gauge_group(spec: MetricSpec, spec_alerts: list[rules.Alert]) -> dict[str, Any]:
    """Values on, just beyond and just inside every bound; each fires exactly where its thresholds hold."""
    values: set[float] = set()
    for t in (a.threshold for a in spec_alerts):
        step = abs(t.value) * 0.1 or 0.1
        values.update((t.value - step, t.value, t.value + step))
    cases = {str(i): x for i, x in enumerate(sorted(values))}
    labels = {case: {**PROCESS, **attribute_labels(spec), "case": case} for case in cases}
    input_series = [{"series": series(series_name(spec), labels[case]),
                     "values": " ".join([repr(x)] * SAMPLES)} for case, x in cases.items()]

    def expect(alert: rules.Alert, t: int) -> list[dict[str, Any]]:
        t_ = alert.threshold
        return [expected_alert(alert, labels[case], x) for case, x in cases.items()
                if OPS[t_.op](x, t_.value) and t >= hold(t_)]

    times = {max(0, hold(a.threshold) - 1) for a in spec_alerts} | {hold(a.threshold) for a in spec_alerts}
    return {"interval": "1m", "input_series": input_series, "alert_rule_test": alert_tests(spec_alerts, expect, times)}


def quantile_group(spec: MetricSpec, alert: rules.Alert) -> dict[str, Any]:
    """Two label sets whose observations all fall in one bucket: the quantile is that bucket's midpoint."""
    t_ = alert.threshold
    quantile = parse_statistic(spec, t_.statistic)
    assert quantile is not None and quantile.q == 0.5, "the midpoint construction needs the median"
    assert spec.buckets is not None
    bands = list(zip((0.0, *spec.buckets), spec.buckets))
    mids = [(low + high) / 2 for low, high in bands]
    firing = min((m for m in mids if OPS[t_.op](m, t_.value)), key=lambda m: abs(m - t_.value))
    quiet = min((m for m in mids if not OPS[t_.op](m, t_.value)), key=lambda m: abs(m - t_.value))
    key = quantile.attribute.replace(".", "_") if quantile.attribute else "llm_rank"
    cases = {"0": firing, "1": quiet}
    input_series = []
    for case, mid in cases.items():
        high = bands[mids.index(mid)][1]
        for le in (*spec.buckets, float("inf")):
            labels = {**PROCESS, **attribute_labels(spec), key: case, "le": "+Inf" if le == float("inf") else repr(le)}
            input_series.append({"series": series(f"{series_name(spec)}_bucket", labels),
                                 "values": f"0+10x{SAMPLES - 1}" if le >= high else f"0x{SAMPLES - 1}"})
    # what survives the aggregation: the process and the attribute the statistic is kept apart by
    kept = {case: {"job": PROCESS["job"], "llm_rank": PROCESS["llm_rank"], key: case} for case in cases}
    (record,) = [r["record"] for r in rules.recording_rules() if series_name(spec) in r["expr"]]
    first = 1  # rate() needs two samples, so the quantile exists from the second minute

    def expect(a: rules.Alert, t: int) -> list[dict[str, Any]]:
        return [expected_alert(a, kept[case], mid) for case, mid in cases.items()
                if OPS[t_.op](mid, t_.value) and t >= first + hold(t_)]

    return {
        "interval": "1m", "input_series": input_series,
        "promql_expr_test": [{"expr": record, "eval_time": "5m",
                               "exp_samples": [{"labels": series(record, kept[case]), "value": mid}
                                               for case, mid in cases.items()]}],
        "alert_rule_test": alert_tests([alert], expect, {first + hold(t_) - 1, first + hold(t_)}),
    }


def increase_group(spec: MetricSpec, alert: rules.Alert) -> dict[str, Any]:
    """A counter that never moves, one that rises, and one whose series first appears at 1 (a first NaN)."""
    cases = {"flat": "2x20", "rising": "0x5 1x14", "appearing": "_x3 1x17"}
    labels = {case: {**PROCESS, **attribute_labels(spec), "case": case} for case in cases}
    input_series = [{"series": series(series_name(spec), labels[case]), "values": values}
                    for case, values in cases.items()]
    firing = {6: ("rising", "appearing"), 13: ()}  # at 13m the last change is more than 5m old

    def expect(a: rules.Alert, t: int) -> list[dict[str, Any]]:
        return [expected_alert(a, labels[case], None) for case in firing[t]]

    return {"interval": "1m", "input_series": input_series,
            "alert_rule_test": alert_tests([alert], expect, set(firing))}


def age_group(spec: MetricSpec, alert: rules.Alert) -> dict[str, Any]:
    """A trainer that keeps stepping (its timestamp follows the clock) and one that stops at minute 5."""
    t_ = alert.threshold
    stop = 5
    cases = {"stepping": f"0+60x{SAMPLES - 1}", "stopped": f"0+60x{stop} {stop * 60}x{SAMPLES - 1 - stop}"}
    labels = {case: {**PROCESS, **attribute_labels(spec), "case": case} for case in cases}
    input_series = [{"series": series(series_name(spec), labels[case]), "values": values}
                    for case, values in cases.items()]
    first = next(t for t in range(SAMPLES) if OPS[t_.op](60 * (t - stop), t_.value))  # age = now - last step
    fires = first + hold(t_)
    assert fires < SAMPLES

    def expect(a: rules.Alert, t: int) -> list[dict[str, Any]]:
        return [expected_alert(a, labels["stopped"], 60.0 * (t - stop))] if t >= fires else []

    return {"interval": "1m", "input_series": input_series,
            "alert_rule_test": alert_tests([alert], expect, {fires - 1, fires})}


def unit_test_file(rules_path: Path) -> dict[str, Any]:
    groups = []
    for spec in CATALOG:
        spec_alerts = [a for a in rules.alerts() if a.spec is spec]
        compared = [a for a in spec_alerts if a.threshold.op in OPS and a.threshold.statistic == "value"]
        if compared:
            groups.append(gauge_group(spec, compared))
        for alert in spec_alerts:
            if alert.threshold.op == "increase":
                groups.append(increase_group(spec, alert))
            elif alert.threshold.statistic == "age":
                groups.append(age_group(spec, alert))
            elif alert.threshold.statistic != "value":
                groups.append(quantile_group(spec, alert))
    return {"rule_files": [str(rules_path)], "evaluation_interval": "1m", "tests": groups}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(require_binary("promtool")), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def write_rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yml"
    path.write_text(rules.render())
    return path


def thresholds() -> list[tuple[str, Threshold]]:
    return [(spec.name, threshold) for spec in CATALOG for threshold in spec.thresholds]


# -- the tests ----------------------------------------------------------------------


def test_every_threshold_has_one_alert_with_its_severity_and_hold_time():
    generated = rules.alerts()
    assert [(a.spec.name, a.threshold) for a in generated] == thresholds()
    assert len({(a.name, a.threshold.severity) for a in generated}) == len(generated)
    for alert in generated:
        rule = alert.rule()
        assert rule["labels"] == {"severity": alert.threshold.severity}
        assert set(rule["annotations"]) == {"summary", "description", "runbook"}
        assert alert.threshold.reason in rule["annotations"]["description"]
        assert rule["annotations"]["runbook"] == RUNBOOKS[alert.name]
        if alert.threshold.op == "increase":
            assert "for" not in rule
        else:
            assert rule["for"] == f"{hold(alert.threshold)}m"
    by_rule = {(a.name, a.threshold.severity): a.rule() for a in generated}
    assert by_rule["LlmAttentionHeadEntropyHigh", "warning"]["for"] == "3m"
    assert by_rule["LlmMemoryPressureHigh", "critical"]["expr"] == "llm_memory_pressure > 0.95"
    assert by_rule["LlmParamUpdateVarianceRatioHigh", "warning"]["expr"] == "llm_param_update_variance_ratio >= 1e-05"
    assert by_rule["LlmGradNormDecayRateLow", "warning"]["expr"] == "llm_grad_norm_decay_rate < -0.1"
    assert by_rule["LlmAnomalyEventsIncreasing", "warning"]["expr"] == (  # a first event creates the series
        "increase(llm_anomaly_events_total[5m]) > 0.0 or "
        "(llm_anomaly_events_total unless llm_anomaly_events_total offset 5m) > 0.0")
    assert set(RUNBOOKS) == {a.name for a in generated}


def test_head_entropy_median_is_recorded_per_layer_and_rank():
    (recorded,) = rules.recording_rules()
    assert recorded == {
        "record": "llm_layer:llm_attention_head_entropy:p50_rate5m",
        "expr": "histogram_quantile(0.5, sum by (job, llm_rank, llm_layer, le) "
                "(rate(llm_attention_head_entropy_bucket[5m])))",
    }


def test_unsupported_threshold_statistics_are_rejected():
    entropy, pressure = by_name("llm.attention.head_entropy"), by_name(MEMORY_PRESSURE)
    with pytest.raises(ValueError, match="names no attribute"):
        parse_statistic(entropy, "p50 per head")
    with pytest.raises(ValueError, match="unsupported threshold statistic"):
        parse_statistic(entropy, "mean")
    with pytest.raises(ValueError, match="unsupported threshold statistic"):
        parse_statistic(pressure, "p50")  # a gauge has no quantiles
    assert parse_statistic(entropy, "p99 per layer").q == 0.99


def test_promtool_accepts_the_rules(tmp_path):
    result = promtool("check", "rules", str(write_rules(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    recorded = len(rules.recording_rules()) + len(rules.rank_aggregates())
    assert f"SUCCESS: {len(thresholds()) + recorded} rules found" in result.stdout


def test_every_threshold_fires_beyond_its_bound_and_not_inside_it(tmp_path):
    tests = unit_test_file(write_rules(tmp_path))
    tested = {t["alertname"] for group in tests["tests"] for t in group["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {a.name for a in rules.alerts()}
    firing = [alert for group in tests["tests"] for t in group["alert_rule_test"] for alert in t["exp_alerts"]]
    assert {(a["exp_labels"]["severity"]) for a in firing} == {"warning", "critical"}
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_annotations_render_the_labels_and_the_value(tmp_path):
    labels = {"job": "trainer", "llm_rank": "3", "llm_device": "cuda:1"}
    tests = {
        "rule_files": [str(write_rules(tmp_path))],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": series("llm_memory_pressure", labels), "values": "0.97x10"}],
            "alert_rule_test": [{"eval_time": "2m", "alertname": "LlmMemoryPressureHigh", "exp_alerts": [{
                "exp_labels": {**labels, "severity": "critical"},
                "exp_annotations": {
                    "summary": "Memory nearly exhausted on rank 3, device cuda:1",
                    "description": ("llm_memory_pressure is 0.97 (critical when > 0.95 for 1m): "
                                    "memory nearly exhausted."),
                    "runbook": RUNBOOKS["LlmMemoryPressureHigh"],
                }}]}],
        }],
    }
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_checked_in_rules_match_the_cli():
    printed = subprocess.run([sys.executable, "-m", "otel_llm.cli", "rules"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert CHECKED_IN.read_text() == printed, (
        f"{CHECKED_IN.relative_to(ROOT)} is stale: run `otel-llm rules > {CHECKED_IN.relative_to(ROOT)}`")


def test_the_old_naming_switch_is_ignored_with_a_note():
    result = subprocess.run([sys.executable, "-m", "otel_llm.cli", "rules", "--naming", "otlp"],
                            capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout == CHECKED_IN.read_text()
    assert "--naming is ignored" in result.stderr


# -- aggregation over ranks -----------------------------------------------------------

RANKS, LAYERS = ("0", "1", "2", "3"), ("0", "1")


def gauge_value(rank: str, layer: str) -> float:
    """Distinct per-rank values, in no rank order, so max and median pick different ranks per layer."""
    return [[0.1, 0.7, 0.3, 0.2], [4.0, 1.0, 2.5, 8.0]][int(layer)][int(rank)]


def quantile_from_buckets(q: float, cumulative: dict[float, float]) -> float:
    """histogram_quantile's linear interpolation inside the bucket holding rank q * total (buckets from 0)."""
    bounds = sorted(cumulative)
    rank, below, lower = q * cumulative[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        if cumulative[bound] >= rank:
            return lower + (bound - lower) * (rank - below) / (cumulative[bound] - below)
        below, lower = cumulative[bound], bound
    raise AssertionError("empty histogram")


def test_per_layer_signals_are_aggregated_over_ranks():
    layered = [spec for spec in CATALOG if "llm.layer" in spec.attributes]
    records = {r["record"] for r in rules.rank_aggregates()}
    for spec in layered:
        name = series_name(spec)
        kinds = (":p50_rate5m",) if spec.instrument == "histogram" else (":max", ":median")
        assert {f"job_llm_layer:{name}{kind}" for kind in kinds} <= records, spec.name
    assert len(records) == sum(1 if s.instrument == "histogram" else 2 for s in layered)


def test_promtool_computes_max_median_and_pooled_quantile_over_ranks(tmp_path):
    """Four ranks, two layers; the expected values are computed here from the input series."""
    input_series: list[dict[str, str]] = []
    expected: dict[str, list[dict[str, Any]]] = {}
    for spec in (s for s in CATALOG if "llm.layer" in s.attributes):
        name = series_name(spec)
        for layer in LAYERS:
            kept = {"job": "trainer", "llm_layer": layer}
            labels = {rank: {**PROCESS, "llm_rank": rank, "llm_world_size": "4", "llm_layer": layer}
                      for rank in RANKS}
            if spec.instrument != "histogram":
                values = sorted(gauge_value(rank, layer) for rank in RANKS)
                input_series += [{"series": series(name, labels[rank]), "values": f"{gauge_value(rank, layer)}x10"}
                                 for rank in RANKS]
                middle = (values[1] + values[2]) / 2  # the median of four: Prometheus interpolates
                for record, value in ((f"job_llm_layer:{name}:max", values[-1]),
                                      (f"job_llm_layer:{name}:median", middle)):
                    expected.setdefault(record, []).append({"labels": series(record, kept), "value": value})
                continue
            assert spec.buckets is not None
            bounds = (*spec.buckets, float("inf"))
            # rank r observes 10 values a minute, all in bucket (r + layer) of the catalog's buckets
            cumulative = {b: 0.0 for b in spec.buckets}
            for rank in RANKS:
                first = int(rank) + int(layer)
                for index, le in enumerate(bounds):
                    per_minute = 10 if index >= first else 0
                    if le != float("inf"):
                        cumulative[le] += per_minute
                    le_label = "+Inf" if le == float("inf") else repr(le)
                    input_series.append({"series": series(f"{name}_bucket", {**labels[rank], "le": le_label}),
                                         "values": f"0+{per_minute}x10"})
            record = f"job_llm_layer:{name}:p50_rate5m"
            expected.setdefault(record, []).append(
                {"labels": series(record, kept), "value": quantile_from_buckets(0.5, cumulative)})
    tests = {"rule_files": [str(write_rules(tmp_path))], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": input_series,
        "promql_expr_test": [{"expr": record, "eval_time": "6m", "exp_samples": samples}
                             for record, samples in expected.items()],
    }]}
    assert set(expected) == {r["record"] for r in rules.rank_aggregates()}
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
