"""Prometheus recording and alerting rules generated from the catalog thresholds.

Each :class:`~otel_llm.catalog.Threshold` becomes one alert labelled with its
severity; thresholds of one signal in one direction share an alert name, so an
Alertmanager inhibit rule on ``alertname`` can silence the warning while the
critical alert fires. A quantile statistic (``p50 per layer``) is first
recorded, then compared. ``increase`` also fires when a counter series first
appears: the SDK creates a counter's series at its first increment, so a first
NaN would otherwise never show up as an increase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import yaml

from otel_llm.catalog import CATALOG, MetricSpec, Threshold
from otel_llm.ops.promql import Naming, Quantile, label, parse_statistic, quantile_expr, series_name
from otel_llm.ops.runbooks import RUNBOOKS

__all__ = ["DEFAULT_FOR", "GROUP", "WINDOW", "Alert", "alert_name", "alerts", "recording_rules", "render"]

GROUP: Final = "otel-llm"
WINDOW: Final = "5m"
"""Range of rate() and increase() in the rules."""
DEFAULT_FOR: Final = {"warning": "5m", "critical": "1m"}
"""Hold time of a comparison whose threshold sets none: a critical condition is acted on sooner."""

_DIRECTION: Final = {">": "High", ">=": "High", "<": "Low", "<=": "Low", "increase": "Increasing"}
_VALUE: Final = '{{ $value | printf "%.4g" }}'


def alert_name(spec: MetricSpec, threshold: Threshold) -> str:
    """``LlmMemoryPressureHigh``: the signal in CamelCase and the direction that fires."""
    words = spec.name.removeprefix("llm.").replace(".", "_").split("_")
    return "Llm" + "".join(word.capitalize() for word in words) + _DIRECTION[threshold.op]


def _recorded_name(spec: MetricSpec, quantile: Quantile, naming: Naming) -> str:
    level = label(quantile.attribute) if quantile.attribute else "llm_rank"
    return f"{level}:{series_name(spec, naming)}:{quantile.percentile}_rate{WINDOW}"


@dataclass(frozen=True)
class Alert:
    """One alerting rule and the threshold it implements."""

    spec: MetricSpec
    threshold: Threshold
    name: str
    expr: str
    hold: str
    summary: str
    description: str

    def rule(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.hold:
            rule["for"] = self.hold
        rule["labels"] = {"severity": self.threshold.severity}
        rule["annotations"] = {"summary": self.summary, "description": self.description,
                               "runbook": RUNBOOKS[self.name]}
        return rule


def _alert(spec: MetricSpec, threshold: Threshold, naming: Naming) -> Alert:
    series = series_name(spec, naming)
    quantile = parse_statistic(spec, threshold.statistic)
    grouping = spec.attributes if quantile is None else (quantile.attribute,) if quantile.attribute else ()
    reason = threshold.reason[:1].upper() + threshold.reason[1:]
    summary = reason + " on rank {{ $labels.llm_rank }}" + "".join(
        f", {attribute.removeprefix('llm.').replace('.', ' ')} {{{{ $labels.{label(attribute)} }}}}"
        for attribute in grouping)
    if threshold.op == "increase":
        bound = repr(threshold.value)
        expr = f"increase({series}[{WINDOW}]) > {bound} or ({series} unless {series} offset {WINDOW}) > {bound}"
        hold = threshold.for_duration
        description = f"{series} increased within {WINDOW} ({threshold.severity} on any increase): {threshold.reason}."
    else:
        hold = threshold.for_duration or DEFAULT_FOR[threshold.severity]
        condition = f"{threshold.severity} when {threshold.op} {threshold.value:g}" + (f" for {hold}" if hold else "")
        if quantile is None:
            expr = f"{series} {threshold.op} {threshold.value!r}"
            description = f"{series} is {_VALUE} ({condition}): {threshold.reason}."
        else:
            expr = f"{_recorded_name(spec, quantile, naming)} {threshold.op} {threshold.value!r}"
            description = (f"{quantile.percentile} of {series} over {WINDOW} is {_VALUE} ({condition}): "
                           f"{threshold.reason}.")
    return Alert(spec, threshold, alert_name(spec, threshold), expr, hold, summary, description)


def alerts(naming: Naming = "scrape") -> list[Alert]:
    """One alert per catalog threshold, in catalog order."""
    return [_alert(spec, threshold, naming) for spec in CATALOG for threshold in spec.thresholds]


def recording_rules(naming: Naming = "scrape") -> list[dict[str, str]]:
    """The quantiles that alerts compare, one recording rule per distinct statistic."""
    rules: dict[str, dict[str, str]] = {}
    for spec in CATALOG:
        for threshold in spec.thresholds:
            quantile = parse_statistic(spec, threshold.statistic)
            if quantile is not None:
                record = _recorded_name(spec, quantile, naming)
                rules[record] = {"record": record, "expr": quantile_expr(spec, quantile, naming, WINDOW)}
    return list(rules.values())


def render(naming: Naming = "scrape") -> str:
    """The rules file: one group, recording rules first so alerts read this evaluation's values."""
    group = {"name": GROUP, "rules": [*recording_rules(naming), *(alert.rule() for alert in alerts(naming))]}
    source = ("otel_llm's own Prometheus endpoint" if naming == "scrape" else
              "OTLP through a Collector or VictoriaMetrics (-opentelemetry.usePrometheusNaming)")
    header = (f"# Generated by `otel-llm rules --naming {naming}` from the otel_llm metric catalog; do not edit.\n"
              f"# Series names: {source}.\n")
    return header + yaml.safe_dump({"groups": [group]}, sort_keys=False, width=1000, allow_unicode=True)
