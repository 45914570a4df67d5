"""The Grafana dashboard generated from the catalog: one panel per signal, in the signal's unit.

Gauges are drawn as they are, with the catalog thresholds as coloured lines;
counters as per-second rates; histograms as p50/p90/p99. A histogram kept per
layer also gets a heatmap repeated for each layer and, when a threshold
watches one of its quantiles, that quantile per layer. The KV hit-ratio panel
shows rate(hits) / rate(lookups) beside the sliding-window gauge. A timestamp
gauge with an age threshold is drawn as its age (``time() - series``). The
throughput families get their own row, "Throughput and goodput".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

from otel_llm.catalog import (
    ATTR_LAYER,
    CATALOG,
    KV_CACHE_HIT_RATIO,
    KV_CACHE_HITS,
    KV_CACHE_LOOKUPS,
    NATS,
    TRAIN_STEPS,
    MetricSpec,
    Threshold,
    by_name,
)
from otel_llm.ops.promql import AGE, GROUP_LABELS, Quantile, label, parse_statistic, quantile_expr, series_name

__all__ = ["SCHEMA_VERSION", "UID", "dashboard", "grafana_unit", "render"]

SCHEMA_VERSION: Final = 39
UID: Final = "otel-llm-training"
RATE_INTERVAL: Final = "$__rate_interval"

_DATASOURCE: Final = {"type": "prometheus", "uid": "${datasource}"}
_SELECTOR: Final = 'job=~"$job", llm_rank=~"$rank"'
_LEGEND: Final = "{{job}} rank {{llm_rank}}"
_QUANTILES: Final = (0.5, 0.9, 0.99)
_UNITS: Final = {"": "none", "1": "none", NATS: "none", "s": "s", "rad": "radian", "By": "bytes"}
_RATIOS: Final = {KV_CACHE_HIT_RATIO: (KV_CACHE_HITS, KV_CACHE_LOOKUPS)}
"""Gauges that are a ratio of two counters: their panel also plots rate(numerator) / rate(denominator)."""
_ROWS: Final = {
    "train": "Training", "grad": "Gradients and updates", "param": "Gradients and updates",
    "loss": "Loss shape", "logits": "Loss shape", "attention": "Attention",
    "activation": "Activations, LoRA and RoPE", "lora": "Activations, LoRA and RoPE",
    "rope": "Activations, LoRA and RoPE", "kv_cache": "KV cache and memory", "memory": "KV cache and memory",
    "telemetry": "Telemetry pipeline", "anomaly": "Telemetry pipeline",
}
_FAMILY_ROWS: Final = {"flops": "Throughput and goodput", "step_time": "Throughput and goodput"}
"""Rows chosen by the producing family before the name's second word (``llm.train.mfu`` is no plain training metric)."""
_COLORS: Final = {None: "green", "warning": "orange", "critical": "red"}
_WIDTH, _HEIGHT, _GRID = 8, 8, 24


def grafana_unit(unit: str, per_second: bool = False) -> str:
    """Grafana's unit id for a catalog unit (``{token}`` counts as ``count:tokens``, nats as a plain number).

    A rate of ``{flop}`` is Grafana's own FLOP/s unit, which scales to TFLOP/s.
    """
    if unit == "{flop}" and per_second:
        return "flops"
    if unit.startswith("{") and unit != NATS:
        return f"count:{unit.strip('{}')}s" + ("/s" if per_second else "")
    if per_second:
        raise ValueError(f"no Grafana rate unit for {unit!r}")
    if unit not in _UNITS:
        raise ValueError(f"no Grafana unit for {unit!r}")
    return _UNITS[unit]


def _holds(threshold: Threshold, x: float) -> bool:
    return {">": x > threshold.value, ">=": x >= threshold.value,
            "<": x < threshold.value, "<=": x <= threshold.value}[threshold.op]


def _steps(thresholds: Iterable[Threshold]) -> list[dict[str, Any]]:
    """Grafana threshold steps: each band takes the colour of the worst threshold that holds in it."""
    thresholds = tuple(thresholds)
    bounds = sorted({t.value for t in thresholds})
    if not bounds:
        return [{"color": "green", "value": None}]
    probes = [bounds[0] - max(1.0, abs(bounds[0]))]
    probes += [(low + high) / 2 for low, high in zip(bounds, bounds[1:])]
    probes.append(bounds[-1] + max(1.0, abs(bounds[-1])))
    starts: list[float | None] = [None, *bounds]
    steps: list[dict[str, Any]] = []
    for start, probe in zip(starts, probes):
        severities = {t.severity for t in thresholds if _holds(t, probe)}
        worst = "critical" if "critical" in severities else "warning" if severities else None
        if not steps or steps[-1]["color"] != _COLORS[worst]:
            steps.append({"color": _COLORS[worst], "value": start})
    return steps


def _legend(attributes: Iterable[str]) -> str:
    return _LEGEND + "".join(f" {a.removeprefix('llm.')} {{{{{label(a)}}}}}" for a in attributes)


def _target(expr: str, legend: str, ref: str, **extra: Any) -> dict[str, Any]:
    return {"datasource": _DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def _timeseries(title: str, spec: MetricSpec, unit: str, targets: list[dict[str, Any]],
                thresholds: Iterable[Threshold] = ()) -> dict[str, Any]:
    steps = _steps(thresholds)
    return {
        "type": "timeseries", "title": title, "description": spec.description, "datasource": _DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps},
                                     "custom": {"thresholdsStyle": {"mode": "line" if len(steps) > 1 else "off"}}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": targets,
    }


def _title(spec: MetricSpec, what: str = "") -> str:
    number = f" (#{spec.signal_number})" if spec.signal_number else ""
    return f"{spec.name}{number}{' ' + what if what else ''}"


def _age_panel(spec: MetricSpec) -> dict[str, Any]:
    expr = f"time() - {series_name(spec)}{{{_SELECTOR}}}"
    watched = [t for t in spec.thresholds if t.statistic == AGE]
    return _timeseries(_title(spec, "age"), spec, grafana_unit(spec.unit), [_target(expr, _LEGEND, "A")], watched)


def _gauge_panel(spec: MetricSpec) -> dict[str, Any]:
    if any(t.statistic == AGE for t in spec.thresholds):
        return _age_panel(spec)
    targets = [_target(f"{series_name(spec)}{{{_SELECTOR}}}", _legend(spec.attributes), "A")]
    if spec.name in _RATIOS:
        numerator, denominator = (series_name(by_name(n)) for n in _RATIOS[spec.name])
        by = ", ".join(GROUP_LABELS)
        targets[0]["legendFormat"] += " (last 64 updates)"
        targets.append(_target(
            f"sum by ({by}) (rate({numerator}{{{_SELECTOR}}}[{RATE_INTERVAL}]))"
            f" / sum by ({by}) (rate({denominator}{{{_SELECTOR}}}[{RATE_INTERVAL}]))",
            f"{_LEGEND} (rate({numerator}) / rate({denominator}))", "B"))
    gauge_thresholds = [t for t in spec.thresholds if t.statistic == "value"]
    return _timeseries(_title(spec), spec, grafana_unit(spec.unit), targets, gauge_thresholds)


def _counter_panel(spec: MetricSpec) -> dict[str, Any]:
    by = ", ".join([*GROUP_LABELS, *map(label, spec.attributes)])
    expr = f"sum by ({by}) (rate({series_name(spec)}{{{_SELECTOR}}}[{RATE_INTERVAL}]))"
    return _timeseries(_title(spec, "per second"), spec, grafana_unit(spec.unit, per_second=True),
                       [_target(expr, _legend(spec.attributes), "A")])


def _histogram_panels(spec: MetricSpec) -> list[dict[str, Any]]:
    selector = f"{{{_SELECTOR}}}"
    unit = grafana_unit(spec.unit)
    targets = [_target(quantile_expr(spec, Quantile(q), RATE_INTERVAL, selector),
                       f"p{q * 100:g} {_LEGEND}", chr(ord("A") + i)) for i, q in enumerate(_QUANTILES)]
    if ATTR_LAYER not in spec.attributes:
        return [_timeseries(_title(spec, "p50/p90/p99"), spec, unit, targets)]
    heatmap = {
        "type": "heatmap", "title": _title(spec, "layer $layer"), "description": spec.description,
        "datasource": _DATASOURCE, "repeat": "layer", "repeatDirection": "h", "maxPerRow": 4,
        "options": {"calculate": False, "yAxis": {"unit": unit}, "cellGap": 1,
                    "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                    "tooltip": {"show": True, "yHistogram": True}},
        "targets": [_target(f'sum by (le) (increase({series_name(spec)}_bucket'
                            f'{{{_SELECTOR}, {label(ATTR_LAYER)}=~"$layer"}}[{RATE_INTERVAL}]))',
                            "{{le}}", "A", format="heatmap")],
    }
    panels = [heatmap]
    for statistic in dict.fromkeys(t.statistic for t in spec.thresholds):
        quantile = parse_statistic(spec, statistic)
        if quantile is not None:
            expr = quantile_expr(spec, quantile, RATE_INTERVAL, selector)
            legend = _legend((quantile.attribute,) if quantile.attribute else ())
            watched = [t for t in spec.thresholds if t.statistic == statistic]
            panels.append(_timeseries(_title(spec, statistic), spec, unit, [_target(expr, legend, "A")], watched))
    return panels


def _panels(spec: MetricSpec) -> list[dict[str, Any]]:
    if spec.instrument == "histogram":
        return _histogram_panels(spec)
    if spec.instrument == "counter":
        return [_counter_panel(spec)]
    return [_gauge_panel(spec)]


def _layout(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of 8x8 panels, three to a line; a repeated panel gets a full line to repeat across."""
    laid: list[dict[str, Any]] = []
    y = 0
    for title, panels in rows.items():
        laid.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                     "gridPos": {"h": 1, "w": _GRID, "x": 0, "y": y}})
        y += 1
        x = 0
        for panel in panels:
            width = _GRID if "repeat" in panel else _WIDTH
            if x + width > _GRID:
                x, y = 0, y + _HEIGHT
            laid.append({**panel, "gridPos": {"h": _HEIGHT, "w": width, "x": x, "y": y}})
            x += width
        y += _HEIGHT
    for number, panel in enumerate(laid, start=1):
        panel["id"] = number
    return laid


def _query_variable(name: str, label_name: str, metric: str, selector: str) -> dict[str, Any]:
    series = f"{metric}{{{selector}}}" if selector else metric
    query = f"label_values({series}, {label_name})"
    return {"name": name, "label": name, "type": "query", "datasource": _DATASOURCE, "query": query,
            "definition": query, "refresh": 2, "sort": 3, "multi": True, "includeAll": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0, "regex": ""}


def dashboard() -> dict[str, Any]:
    """The dashboard model (import it in Grafana or provision it from a file)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for spec in CATALOG:
        family = spec.name.split(".")[1]
        row = _FAMILY_ROWS.get(spec.family) or _ROWS.get(family, family.capitalize())
        rows.setdefault(row, []).extend(_panels(spec))
    steps = series_name(by_name(TRAIN_STEPS))
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": ""},
        _query_variable("job", "job", steps, ""),
        _query_variable("rank", "llm_rank", steps, 'job=~"$job"'),
    ]
    layered = [s for s in CATALOG if s.instrument == "histogram" and ATTR_LAYER in s.attributes]
    if layered:
        variables.append(_query_variable("layer", label(ATTR_LAYER), f"{series_name(layered[0])}_bucket",
                                         _SELECTOR))
    return {
        "uid": UID, "title": "otel_llm: LLM training signals", "tags": ["otel-llm", "llm", "training"],
        "description": "Generated by `otel-llm dashboard` from the otel_llm metric catalog.",
        "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "browser",
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": variables},
        "panels": _layout(rows),
    }


def render() -> str:
    """The dashboard as JSON text, stable for checking in."""
    return json.dumps(dashboard(), indent=2) + "\n"
