"""Series names on each path: what an OTLP-to-Prometheus translation names a metric, from the upstream rules.

The OpenTelemetry Collector (``prometheus`` / ``prometheusremotewrite``
exporters, pkg/translator/prometheus ``normalizeName``) and Prometheus 3's OTLP
receiver (github.com/prometheus/otlptranslator ``MetricNamer`` with the default
``UnderscoreEscapingWithSuffixes`` strategy) share this algorithm; neither
binary runs on this machine, so tests compare the catalog with this model, and
VictoriaMetrics (``-opentelemetry.usePrometheusNaming``) with the real thing.

1. split the name into words on every character outside ``[a-zA-Z0-9:]``;
2. the unit: the part before ``/`` maps through the UCUM table (``s`` ->
   ``seconds``, ``1`` -> nothing) and is dropped when it holds ``{`` or ``}``;
   a per-unit after ``/`` becomes ``per_<unit>``; a suffix already among the
   words is not added again;
3. a monotonic sum: every ``total`` word removed, ``total`` appended;
4. a gauge with unit exactly ``1``: every ``ratio`` word removed, ``ratio`` appended;
5. words joined with ``_``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY, generate_latest

from otel_llm.catalog import MetricSpec
from tests.support.scrape import series

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_MARK = {"naming_test": "1"}

_UNITS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds", "us": "microseconds",
    "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "TiBy": "tibibytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius",
    "Hz": "hertz", "1": "", "%": "percent",
}
_PER_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}
_INVALID = re.compile(r"[^a-zA-Z0-9:]")

OTLP_KIND = {"observable_gauge": "gauge", "gauge": "gauge", "counter": "monotonic_sum",
             "up_down_counter": "sum", "histogram": "histogram"}
"""The OTLP data type the Python SDK exports for each instrument kind."""


def _clean(unit: str) -> str:
    return re.sub(r"__+", "_", _INVALID.sub("_", unit)).lstrip("_")


def translated_name(name: str, unit: str, kind: str) -> str:
    """The Prometheus metric name (before _bucket/_sum/_count) of an OTLP metric of data type ``kind``."""
    words = [w for w in _INVALID.split(name) if w]
    main, _, per = (part.strip() for part in unit.partition("/"))
    main_suffix = _UNITS.get(main, main) if main and not set(main) & set("{}") else ""
    per_suffix = "per_" + _PER_UNITS.get(per, per) if per and not set(per) & set("{}") else ""
    main_suffix, per_suffix = _clean(main_suffix), _clean(per_suffix)
    if main_suffix in words:
        main_suffix = ""
    if per_suffix == "per_" or per_suffix.removesuffix("_") in words:
        per_suffix = ""
    words += [s.removesuffix("_") if per_suffix else s for s in (main_suffix,) if s]
    words += [per_suffix.removesuffix("_")] if per_suffix else []
    if kind == "monotonic_sum":
        words = [w for w in words if w != "total"] + ["total"]
    if unit == "1" and kind == "gauge":
        words = [w for w in words if w != "ratio"] + ["ratio"]
    return "_".join(words)


def record_every_metric(meter: Meter, specs: Iterable[MetricSpec], attributes: dict[str, str]) -> None:
    """One measurement of each spec's instrument kind, unit and buckets, with ``attributes`` plus its own keys."""
    for spec in specs:
        point = {**attributes, **{a: "0" for a in spec.attributes}}
        if spec.instrument == "observable_gauge":
            meter.create_observable_gauge(spec.name, [lambda _, p=point: [Observation(0.5, p)]], spec.unit)
        elif spec.instrument == "counter":
            meter.create_counter(spec.name, spec.unit).add(2, point)
        elif spec.instrument == "histogram":
            meter.create_histogram(spec.name, spec.unit, explicit_bucket_boundaries_advisory=spec.buckets).record(
                0.3, point)
        else:
            raise AssertionError(f"{spec.name}: no recorder for {spec.instrument}")


def series_names(spec: MetricSpec, base: str) -> set[str]:
    """The sample names a Prometheus backend stores for ``spec`` named ``base``."""
    return {base + s for s in HISTOGRAM_SUFFIXES} if spec.instrument == "histogram" else {base}


def exposed_names(specs: Iterable[MetricSpec]) -> set[str]:
    """Sample names otel_llm's Prometheus reader (the SDK's) exposes for one measurement of each spec."""
    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        record_every_metric(provider.get_meter("naming"), specs, _MARK)
        body = generate_latest(REGISTRY).decode()
    finally:
        provider.shutdown()
    return {name for name, labels, _ in series(body) if labels.get("naming_test") == "1"}
