"""Series names and PromQL expressions for catalog signals, shared by the rules and the dashboard.

A catalog signal has one series name on every path (otel_llm's endpoint, and
OTLP translated to Prometheus names by a Collector, VictoriaMetrics or
Prometheus 3), because the catalog's units follow the rule in
:mod:`otel_llm.catalog`; so one rules file and one dashboard serve them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from otel_llm.catalog import MetricSpec, prometheus_name

__all__ = [
    "AGE",
    "GROUP_LABELS",
    "Quantile",
    "label",
    "parse_statistic",
    "quantile_expr",
    "series_name",
]

GROUP_LABELS: Final = ("job", "llm_rank")
"""Labels that tell one training process from another; aggregations keep them."""

AGE: Final = "age"
"""Threshold statistic of a timestamp gauge: seconds since it, ``time() - series``."""

_QUANTILE = re.compile(r"p(\d+(?:\.\d+)?)(?: per (\w+))?")


def label(attribute: str) -> str:
    """The Prometheus label of an OTel attribute key (``llm.layer`` -> ``llm_layer``)."""
    return attribute.replace(".", "_")


def series_name(spec: MetricSpec) -> str:
    """The series name of ``spec`` (histograms add _bucket/_sum/_count to it)."""
    return prometheus_name(spec.name, spec.unit, spec.instrument)


@dataclass(frozen=True)
class Quantile:
    """A histogram quantile, optionally kept apart per one catalog attribute."""

    q: float
    attribute: str | None = None

    @property
    def percentile(self) -> str:
        return f"p{self.q * 100:g}"


def parse_statistic(spec: MetricSpec, statistic: str) -> Quantile | None:
    """None for ``value`` (compare the series) and :data:`AGE`; a :class:`Quantile` for ``p50 per layer``.

    Raises ValueError for anything else, so a new kind of threshold cannot be skipped silently.
    """
    if statistic == "value":
        return None
    if statistic == AGE:
        if spec.instrument not in ("gauge", "observable_gauge") or spec.unit != "s":
            raise ValueError(f"{spec.name}: {AGE!r} needs a gauge of Unix time in seconds")
        return None
    match = _QUANTILE.fullmatch(statistic)
    if match is None or spec.instrument != "histogram":
        raise ValueError(f"{spec.name}: unsupported threshold statistic {statistic!r}")
    attribute = None
    if match.group(2) is not None:
        matching = [a for a in spec.attributes if a.rsplit(".", 1)[-1] == match.group(2)]
        if len(matching) != 1:
            raise ValueError(f"{spec.name}: {statistic!r} names no attribute of the signal")
        attribute = matching[0]
    return Quantile(float(match.group(1)) / 100, attribute)


def quantile_expr(spec: MetricSpec, quantile: Quantile, window: str, selector: str = "") -> str:
    """``histogram_quantile`` over the bucket rates, one result per process (and attribute)."""
    by = [*GROUP_LABELS, *([label(quantile.attribute)] if quantile.attribute else []), "le"]
    bucket = f"{series_name(spec)}_bucket{selector}"
    return f"histogram_quantile({quantile.q:g}, sum by ({', '.join(by)}) (rate({bucket}[{window}])))"
