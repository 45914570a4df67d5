"""Views derived from the catalog: the exported schema, declared up front.

Each histogram gets its catalog bucket boundaries (explicit buckets only: the
Prometheus endpoint cannot serve exponential histograms), each metric keeps only
its catalog attribute keys (bounded cardinality), and disabled signals are
dropped before aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry.sdk.metrics.view import (
    DropAggregation,
    ExplicitBucketHistogramAggregation,
    View,
)

from otel_llm.catalog import CATALOG, MetricSpec
from otel_llm.config import Config

__all__ = ["build_views"]


def _view(spec: MetricSpec, disabled: bool) -> View:
    if disabled:
        return View(instrument_name=spec.name, aggregation=DropAggregation())
    aggregation = ExplicitBucketHistogramAggregation(list(spec.buckets)) if spec.buckets is not None else None
    return View(instrument_name=spec.name, attribute_keys=set(spec.attributes), aggregation=aggregation)


def build_views(config: Config, extra: Iterable[MetricSpec] = ()) -> list[View]:
    """One View per catalog entry and per user-declared metric."""
    views = [_view(spec, config.is_disabled(spec.name)) for spec in CATALOG]
    views.extend(_view(spec, False) for spec in extra)
    return views
