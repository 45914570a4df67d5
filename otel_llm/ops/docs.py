"""Markdown rendered from the catalog and the config (tables, the alert guide), kept in the README by a test."""

from __future__ import annotations

from otel_llm.catalog import CATALOG, prometheus_name
from otel_llm.config import options
from otel_llm.ops import rules
from otel_llm.ops.runbooks import RUNBOOKS
from otel_llm.probes._peak_flops import peak_table

__all__ = ["config_table", "metric_table", "peak_table", "signal_guide", "threshold_table"]

_DIRECTION = {">": "high", ">=": "high", "<": "low", "<=": "low", "increase": "increasing"}


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def metric_table() -> str:
    """Every catalog metric: OTel name, Prometheus series, instrument, unit, attributes, buckets."""
    rows = ["| # | name | Prometheus | instrument | unit | attributes | description |",
            "|---|---|---|---|---|---|---|"]
    for spec in CATALOG:
        buckets = f" Buckets: {', '.join(f'{b:g}' for b in spec.buckets)}." if spec.buckets else ""
        rows.append(
            f"| {spec.signal_number or ''} | `{spec.name}` "
            f"| `{prometheus_name(spec.name, spec.unit, spec.instrument)}` "
            f"| {spec.instrument} | {f'`{spec.unit}`' if spec.unit else '(none)'} "
            f"| {', '.join(f'`{a}`' for a in spec.attributes)} "
            f"| {_cell(spec.description)}{buckets} |")
    return "\n".join(rows)


def threshold_table() -> str:
    """The catalog thresholds: what fires, at which severity, and what it means."""
    rows = ["| signal | severity | condition | meaning |", "|---|---|---|---|"]
    for spec in CATALOG:
        for threshold in spec.thresholds:
            if threshold.op == "increase":
                condition = "any increase"
            else:
                condition = f"{threshold.statistic} {threshold.op} {threshold.value:g}"
                if threshold.for_duration:
                    condition += f" for {threshold.for_duration}"
            rows.append(f"| `{spec.name}` | {threshold.severity} | {_cell(condition)} | {threshold.reason} |")
    return "\n".join(rows)


def signal_guide() -> str:
    """What to do when a signal crosses a catalog threshold: one entry per alert of ``otel-llm rules``.

    Each entry gives the PromQL the alert evaluates, how long it
    must hold, what it means at each severity and what to check first.
    """
    recorded = {rule["record"]: rule["expr"] for rule in rules.recording_rules()}
    by_name: dict[str, list[rules.Alert]] = {}
    for alert in rules.alerts():
        by_name.setdefault(alert.name, []).append(alert)
    entries = []
    for name, alerts in by_name.items():
        spec = alerts[0].spec
        lines = [f"#### `{spec.name}` {_DIRECTION[alerts[0].threshold.op]} (alert `{name}`)", ""]
        for alert in alerts:
            held = f", held for {alert.hold}" if alert.hold else ""
            lines.append(f"- **{alert.threshold.severity}**: {alert.threshold.reason} — `{alert.expr}`{held}.")
        for record, expr in recorded.items():
            if record in alerts[0].expr:
                lines.append(f"- `{record}` is recorded as `{expr}`.")
        lines.append(f"- **What to do**: {RUNBOOKS[name]}")
        entries.append("\n".join(lines))
    return "\n\n".join(entries)


def config_table() -> str:
    """Every option: Config field, environment variable, default, meaning."""
    rows = ["| Config field | environment variable | default | meaning |", "|---|---|---|---|"]
    for name, env_var, default, help_text in options():
        shown = ",".join(default) if isinstance(default, tuple) else default
        rows.append(f"| `{name}` | `{env_var}` | `{shown if shown not in ('', None) else '(unset)'}` "
                    f"| {_cell(help_text)} |")
    return "\n".join(rows)
