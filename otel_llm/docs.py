"""Markdown tables rendered from the catalog and the config, kept in the README by a test."""

from __future__ import annotations

from otel_llm.catalog import CATALOG, prometheus_name
from otel_llm.config import options

__all__ = ["config_table", "metric_table", "threshold_table"]


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
            f"| {spec.instrument} | `{spec.unit}` | {', '.join(f'`{a}`' for a in spec.attributes)} "
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


def config_table() -> str:
    """Every option: Config field, environment variable, default, meaning."""
    rows = ["| Config field | environment variable | default | meaning |", "|---|---|---|---|"]
    for name, env_var, default, help_text in options():
        shown = ",".join(default) if isinstance(default, tuple) else default
        rows.append(f"| `{name}` | `{env_var}` | `{shown if shown not in ('', None) else '(unset)'}` "
                    f"| {_cell(help_text)} |")
    return "\n".join(rows)
