"""One session's user metrics: those of the ``OTEL_LLM_SCHEMA`` file and those ``register()`` adds.

``record()`` is called from inside the training loop, so it never raises: an
unknown name, a value that is not a number or attributes that are not a mapping
are dropped with one warning per metric and kind, NaN/Inf are counted in
``llm.telemetry.nonfinite``, and a negative counter increment or histogram
value is dropped with one warning (the OTel SDK's own semantics). A metric no
View of ours covers (one registered after the provider was built, or any on a
provider the caller brought) gets the same attribute-overflow warning as the
others through :class:`otel_llm.export.views.AttributeSets`.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from opentelemetry.metrics import Meter

from otel_llm.catalog import MetricSpec, prometheus_name
from otel_llm.export.views import AttributeSets
from otel_llm.pipeline.publisher import Recorder, create_recorder
from otel_llm.runtime import fork
from otel_llm.runtime.log_once import once
from otel_llm.schema import builtin_names, validate_spec

__all__ = ["UserMetrics", "as_number", "describe", "is_scalar"]

_logger = logging.getLogger(__name__)


def is_scalar(value: object) -> bool:
    """A real number (not a bool) or a one-element real tensor: what a loss or a metric value may be."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.dtype.is_complex
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def describe(value: object) -> str:
    """What a rejected value was, for the warning: its type, and a tensor's shape."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def as_number(value: object) -> float | None:
    """``value`` as a float when :func:`is_scalar` (a device tensor is read to the host), else None."""
    return float(value) if is_scalar(value) else None  # type: ignore[arg-type]


def _dropped(name: str, kind: str, message: str, *args: object) -> None:
    once(_logger, logging.WARNING, ("record", name, kind), "otel_llm: record(%r): " + message + "; dropped",
         name, *args)


@dataclass(frozen=True)
class _UserMetric:
    spec: MetricSpec
    recorder: Recorder
    attribute_sets: AttributeSets | None


class UserMetrics:
    """The user metrics of one meter; ``viewed`` are those the provider's Views already watch for overflow."""

    def __init__(self, meter: Meter, schema: Iterable[MetricSpec], viewed: Iterable[MetricSpec],
                 count_nonfinite: Callable[[str], None]) -> None:
        self._meter = meter
        self._count_nonfinite = count_nonfinite
        self._metrics: dict[str, _UserMetric] = {}
        covered = set(viewed)
        for spec in schema:
            self._add(spec, watched=spec not in covered)

    def _add(self, spec: MetricSpec, watched: bool) -> None:
        sets = AttributeSets(spec.name) if watched and spec.attributes else None
        self._metrics[spec.name] = _UserMetric(spec, create_recorder(self._meter, spec), sets)

    def register(self, raw: Mapping[str, Any]) -> MetricSpec:
        """Validate a declaration like a schema entry (SchemaError naming the rule) and create its instrument."""
        taken = builtin_names()
        taken.update({name: prometheus_name(m.spec.name, m.spec.unit, m.spec.instrument)
                      for name, m in self._metrics.items()})
        spec = validate_spec(raw, source="register()", entry=repr(raw.get("name")), taken=taken)
        self._add(spec, watched=True)
        return spec

    def record(self, name: str, value: object, attributes: object = None) -> None:
        """Record one value; whatever is wrong with the call drops it with one warning instead of raising."""
        if fork.forked:  # a forked worker never exports; recording could wait on a lock copied mid-use
            return
        metric = self._metrics.get(name) if isinstance(name, str) else None
        if metric is None:
            once(_logger, logging.WARNING, ("record", "unknown"),
                 "otel_llm: record(%r): no such user metric (declare it in OTEL_LLM_SCHEMA or register() it; "
                 "built-in metrics are not recordable); dropped, and so is any other unknown name", name)
            return
        number = as_number(value)
        if number is None:
            _dropped(name, "type", "takes a number or a one-element tensor, got %s", describe(value))
            return
        if attributes is not None and not isinstance(attributes, Mapping):
            _dropped(name, "attributes", "attributes must be a mapping, got %s", type(attributes).__name__)
            return
        if number != number or number in (float("inf"), float("-inf")):
            self._count_nonfinite(name)
            return
        kept = {key: item for key, item in (attributes or {}).items() if key in metric.spec.attributes}
        if metric.attribute_sets is not None:
            metric.attribute_sets.add(kept)
        metric.recorder(number, kept)
