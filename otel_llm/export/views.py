"""Views derived from the catalog: the exported schema, declared up front.

Each histogram gets its catalog bucket boundaries (explicit buckets only: the
Prometheus endpoint cannot serve exponential histograms), each metric keeps only
its catalog attribute keys (bounded cardinality), and disabled signals are
dropped before aggregation.

Past the SDK's cardinality limit (2000 attribute sets per metric and reader
unless configured) further attribute sets are folded into one point labelled
``otel.metric.overflow=true`` without a word in the log; the Views of metrics
with attributes log that once per metric (:class:`OverflowLogged`). A metric
declared after the provider was built (``register()``) has no View of ours; its
recording side gives the same warning (:class:`AttributeSets`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.sdk.metrics.view import (
    Aggregation,
    DefaultAggregation,
    DropAggregation,
    ExplicitBucketHistogramAggregation,
    View,
)

from otel_llm.catalog import CATALOG, MetricSpec
from otel_llm.config import Config
from otel_llm.runtime.log_once import LogOnce

__all__ = ["OVERFLOW_ATTRIBUTE", "SDK_CARDINALITY_LIMIT", "AttributeSets", "OverflowLogged", "build_views"]

_logger = logging.getLogger(__name__)

OVERFLOW_ATTRIBUTE = "otel.metric.overflow"
"""The attribute the SDK puts on the point that collects the attribute sets past its cardinality limit."""


SDK_CARDINALITY_LIMIT = 2000
"""Attribute sets the SDK keeps per metric and reader unless configured; the next one overflows."""


def _warn_overflow(log: LogOnce, name: str) -> None:
    log(_logger, logging.WARNING, ("overflow", name),
        "otel_llm: %s has more distinct attribute sets than the SDK keeps per metric (%d unless configured); the "
        "others are now folded into one series labelled %s=true. Record fewer distinct attribute values.",
        name, SDK_CARDINALITY_LIMIT, OVERFLOW_ATTRIBUTE)


class AttributeSets:
    """The attribute sets one metric recorded, up to the SDK's limit; the first one past it is warned about.

    For metrics without a View of ours. Memory stays at most
    :data:`SDK_CARDINALITY_LIMIT` sets, and nothing once the warning is given.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._seen: set[frozenset[tuple[str, Any]]] | None = set()
        self._logged = LogOnce()

    def add(self, attributes: Mapping[str, Any]) -> None:
        """Note one recording's attributes."""
        seen = self._seen
        if seen is None:
            return
        key = frozenset(attributes.items())
        if key in seen:
            return
        if len(seen) >= SDK_CARDINALITY_LIMIT:
            self._seen = None
            _warn_overflow(self._logged, self._name)
            return
        seen.add(key)


class OverflowLogged(Aggregation):
    """``inner``'s aggregation, plus one warning naming the metric when its attribute sets overflow.

    The SDK asks the View's aggregation for a new aggregator for every new
    attribute set, the overflow set included, so this sees the first overflow
    of each reader; the warning is given once for all readers of the View.
    Wrapping the default aggregation pins the SDK's per-instrument default on
    every reader: a histogram without declared buckets gets the SDK's explicit
    buckets even where an OTLP reader would prefer exponential ones.
    """

    def __init__(self, inner: Aggregation) -> None:
        self._inner = inner
        self._overflowed = LogOnce()

    def _create_aggregation(self, instrument: Any, attributes: Any, reservoir_factory: Callable[..., Any],
                            start_time_unix_nano: int) -> Any:
        if attributes and attributes.get(OVERFLOW_ATTRIBUTE) is True:
            _warn_overflow(self._overflowed, instrument.name)
        return self._inner._create_aggregation(instrument, attributes, reservoir_factory, start_time_unix_nano)


def _view(spec: MetricSpec, disabled: bool) -> View:
    if disabled:
        return View(instrument_name=spec.name, aggregation=DropAggregation())
    aggregation: Aggregation | None = (ExplicitBucketHistogramAggregation(list(spec.buckets))
                                       if spec.buckets is not None else None)
    if spec.attributes:  # without attributes a metric has one attribute set and cannot overflow
        aggregation = OverflowLogged(aggregation or DefaultAggregation())
    return View(instrument_name=spec.name, attribute_keys=set(spec.attributes), aggregation=aggregation)


def build_views(config: Config, extra: Iterable[MetricSpec] = ()) -> list[View]:
    """One View per catalog entry and per user-declared metric."""
    views = [_view(spec, config.is_disabled(spec.name)) for spec in CATALOG]
    views.extend(_view(spec, False) for spec in extra)
    return views
