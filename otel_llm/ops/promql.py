"""Series names and PromQL expressions for catalog signals, shared by the rules and the dashboard.

The same signal reaches a PromQL backend under two naming schemes:

* ``scrape``: otel_llm's own Prometheus endpoint, named by the catalog's
  :func:`~otel_llm.catalog.prometheus_name` (unit ``1`` adds no suffix);
* ``otlp``: OTLP translated to Prometheus names by an OpenTelemetry Collector's
  ``prometheus``/``prometheusremotewrite`` exporter or by VictoriaMetrics with
  ``-opentelemetry.usePrometheusNaming``, which also append ``_ratio`` to gauges with unit ``1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

from otel_llm.catalog import MetricSpec, prometheus_name

__all__ = [
    "GROUP_LABELS",
    "NAMINGS",
    "Naming",
    "Quantile",
    "label",
    "parse_statistic",
    "quantile_expr",
    "series_name",
]

Naming = Literal["scrape", "otlp"]
NAMINGS: Final = get_args(Naming)

GROUP_LABELS: Final = ("job", "llm_rank")
"""Labels that tell one training process from another; aggregations keep them."""

_GAUGES = ("observable_gauge", "gauge")
_QUANTILE = re.compile(r"p(\d+(?:\.\d+)?)(?: per (\w+))?")


def label(attribute: str) -> str:
    """The Prometheus label of an OTel attribute key (``llm.layer`` -> ``llm_layer``)."""
    return attribute.replace(".", "_")


def series_name(spec: MetricSpec, naming: Naming) -> str:
    """The series name of ``spec`` under ``naming`` (histograms add _bucket/_sum/_count to it)."""
    name = prometheus_name(spec.name, spec.unit, spec.instrument)
    if naming == "otlp" and spec.instrument in _GAUGES and spec.unit == "1" and not name.endswith("_ratio"):
        name += "_ratio"
    return name


@dataclass(frozen=True)
class Quantile:
    """A histogram quantile, optionally kept apart per one catalog attribute."""

    q: float
    attribute: str | None = None

    @property
    def percentile(self) -> str:
        return f"p{self.q * 100:g}"


def parse_statistic(spec: MetricSpec, statistic: str) -> Quantile | None:
    """None for ``value`` (compare the series itself); a :class:`Quantile` for ``p50 per layer``.

    Raises ValueError for anything else, so a new kind of threshold cannot be skipped silently.
    """
    if statistic == "value":
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


def quantile_expr(spec: MetricSpec, quantile: Quantile, naming: Naming, window: str, selector: str = "") -> str:
    """``histogram_quantile`` over the bucket rates, one result per process (and attribute)."""
    by = [*GROUP_LABELS, *([label(quantile.attribute)] if quantile.attribute else []), "le"]
    bucket = f"{series_name(spec, naming)}_bucket{selector}"
    return f"histogram_quantile({quantile.q:g}, sum by ({', '.join(by)}) (rate({bucket}[{window}])))"
