"""Prometheus recording and alerting rules generated from the catalog thresholds.

Each :class:`~otel_llm.catalog.Threshold` becomes one alert labelled with its
severity; thresholds of one signal in one direction share an alert name, so an
Alertmanager inhibit rule on ``alertname`` can silence the warning while the
critical alert fires. A quantile statistic (``p50 per layer``) is first
recorded, then compared; ``age`` compares the time since a timestamp gauge
(``time() - series``: the stalled-trainer alert). ``increase`` also fires when a counter series first
appears: the SDK creates a counter's series at its first increment, so a first
NaN would otherwise never show up as an increase.

Every per-layer signal is also recorded over ranks (max and median per job and
layer; a histogram's median over the buckets of all ranks), so a dashboard or
an alert on a 1,024-rank job reads one series per layer instead of one per
rank and layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import yaml

from otel_llm.catalog import ATTR_LAYER, CATALOG, MetricSpec, Threshold
from otel_llm.ops.promql import AGE, Quantile, label, parse_statistic, quantile_expr, series_name
from otel_llm.ops.runbooks import RUNBOOKS

__all__ = ["DEFAULT_FOR", "GROUP", "RANK_AGGREGATE_BY", "WINDOW", "Alert", "alert_name", "alerts", "groups",
           "rank_aggregates", "recording_rules", "render"]

GROUP: Final = "otel-llm"
WINDOW: Final = "5m"
"""Range of rate() and increase() in the rules."""
DEFAULT_FOR: Final = {"warning": "5m", "critical": "1m"}
"""Hold time of a comparison whose threshold sets none: a critical condition is acted on sooner."""
RANK_AGGREGATE_BY: Final = ("job",)
"""Labels the over-ranks aggregates keep besides the signal's attributes: one training job, all its ranks."""

_DIRECTION: Final = {">": "High", ">=": "High", "<": "Low", "<=": "Low", "increase": "Increasing"}
_VALUE: Final = '{{ $value | printf "%.4g" }}'


def alert_name(spec: MetricSpec, threshold: Threshold) -> str:
    """``LlmMemoryPressureHigh``: the signal in CamelCase and the direction that fires.

    An age threshold on a timestamp reads ``LlmTrainLastStepStale``.
    """
    words = spec.name.removeprefix("llm.").replace(".", "_").split("_")
    if threshold.statistic == AGE:
        return "Llm" + "".join(word.capitalize() for word in words if word != "timestamp") + "Stale"
    return "Llm" + "".join(word.capitalize() for word in words) + _DIRECTION[threshold.op]


def _recorded_name(spec: MetricSpec, quantile: Quantile) -> str:
    level = label(quantile.attribute) if quantile.attribute else "llm_rank"
    return f"{level}:{series_name(spec)}:{quantile.percentile}_rate{WINDOW}"


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


def _alert(spec: MetricSpec, threshold: Threshold) -> Alert:
    series = series_name(spec)
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
        if threshold.statistic == AGE:
            expr = f"time() - {series} {threshold.op} {threshold.value!r}"
            description = f"The last update of {series} is {_VALUE} s old ({condition}): {threshold.reason}."
        elif quantile is None:
            expr = f"{series} {threshold.op} {threshold.value!r}"
            description = f"{series} is {_VALUE} ({condition}): {threshold.reason}."
        else:
            expr = f"{_recorded_name(spec, quantile)} {threshold.op} {threshold.value!r}"
            description = (f"{quantile.percentile} of {series} over {WINDOW} is {_VALUE} ({condition}): "
                           f"{threshold.reason}.")
    return Alert(spec, threshold, alert_name(spec, threshold), expr, hold, summary, description)


def alerts() -> list[Alert]:
    """One alert per catalog threshold, in catalog order."""
    return [_alert(spec, threshold) for spec in CATALOG for threshold in spec.thresholds]


def recording_rules() -> list[dict[str, str]]:
    """The quantiles that alerts compare, one recording rule per distinct statistic."""
    rules: dict[str, dict[str, str]] = {}
    for spec in CATALOG:
        for threshold in spec.thresholds:
            quantile = parse_statistic(spec, threshold.statistic)
            if quantile is not None:
                record = _recorded_name(spec, quantile)
                rules[record] = {"record": record, "expr": quantile_expr(spec, quantile, WINDOW)}
    return list(rules.values())


def rank_aggregates() -> list[dict[str, str]]:
    """Max and median over ranks of every per-layer signal, per job and attribute set (``job_llm_layer:...``)."""
    rules = []
    for spec in CATALOG:
        if ATTR_LAYER not in spec.attributes:
            continue
        by = [*RANK_AGGREGATE_BY, *map(label, spec.attributes)]
        level, series = "_".join(by), series_name(spec)
        if spec.instrument == "histogram":
            expr = f"histogram_quantile(0.5, sum by ({', '.join([*by, 'le'])}) (rate({series}_bucket[{WINDOW}])))"
            rules.append({"record": f"{level}:{series}:p50_rate{WINDOW}", "expr": expr})
            continue
        rules.append({"record": f"{level}:{series}:max", "expr": f"max by ({', '.join(by)}) ({series})"})
        rules.append({"record": f"{level}:{series}:median",
                      "expr": f"quantile by ({', '.join(by)}) (0.5, {series})"})
    return rules


def groups() -> list[dict[str, Any]]:
    """The rule groups: recording rules first, so alerts read this evaluation's values."""
    return [{"name": GROUP, "rules": [*recording_rules(), *rank_aggregates(), *(a.rule() for a in alerts())]}]


def render() -> str:
    """The Prometheus rules file (``rule_files:`` of Prometheus, vmalert)."""
    header = ("# Generated by `otel-llm rules` from the otel_llm metric catalog; do not edit.\n"
              "# Series names are the same on otel_llm's endpoint and after OTLP translation to Prometheus names.\n")
    return header + yaml.safe_dump({"groups": groups()}, sort_keys=False, width=1000, allow_unicode=True)
