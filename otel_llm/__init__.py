"""otel_llm: LLM training signals as OpenTelemetry metrics.

One call instruments a model and optimizer::

    import otel_llm
    with otel_llm.instrument(model, optimizer):
        train()

or run an unmodified script with ``opentelemetry-instrument python train.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from otel_llm.catalog import CATALOG, MetricSpec
from otel_llm.config import Config
from otel_llm.runtime.log_once import once
from otel_llm.schema import SchemaError
from otel_llm.session import Instrumentation, active, check_types
from otel_llm.version import __version__

_logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from opentelemetry.metrics import MeterProvider

__all__ = [
    "CATALOG",
    "Config",
    "Instrumentation",
    "MetricSpec",
    "SchemaError",
    "__version__",
    "instrument",
    "record",
    "register",
]


def instrument(model: torch.nn.Module | None = None, optimizer: Any = None, *,
               meter_provider: MeterProvider | None = None, config: Config | None = None) -> Instrumentation:
    """Start exporting training signals; returns a handle (context manager, ``.shutdown()``).

    Without ``meter_provider`` a provider with the catalog Views and the readers
    of ``config.exporters`` (default: Prometheus and OTLP) is built. Without
    ``model``/``optimizer`` they are found as they first run; ``optimizer`` may be
    a wrapper of a torch optimizer (DeepSpeed's, accelerate's). Calling this while
    a session is active returns that session.
    """
    optimizer = check_types(model, optimizer)
    current = active()
    if current is not None:
        if config is not None and config != current.config:
            _logger.warning("otel_llm: a session is already running; it was returned unchanged and the new "
                            "Config was not applied (shut the running session down first to change it)")
        current.attach(model, optimizer)
        return current
    return Instrumentation(model, optimizer, config=config, meter_provider=meter_provider)


def _current() -> Instrumentation:
    session = active()
    if session is None:
        raise RuntimeError("otel_llm is not instrumenting anything: call otel_llm.instrument() "
                           "or run under opentelemetry-instrument first")
    return session


def register(name: str, instrument: str, *, unit: str = "", description: str = "",
             attributes: Iterable[str] = (), buckets: Iterable[float] | None = None) -> MetricSpec:
    """Declare a custom metric on the active session (see :meth:`Instrumentation.register`)."""
    return _current().register(name, instrument, unit=unit, description=description,
                               attributes=attributes, buckets=buckets)


def record(name: str, value: float, attributes: Mapping[str, str] | None = None) -> None:
    """Record a custom metric on the active session (see :meth:`Instrumentation.record`).

    Without a session the value is dropped with one warning: this is called from
    inside the training loop, which must not stop because telemetry is not running.
    """
    session = active()
    if session is None:
        once(_logger, logging.WARNING, "record without a session",
             "otel_llm: record(%r) without a running session (call otel_llm.instrument() or run under "
             "opentelemetry-instrument first); dropped, and so is every record() until one runs", name)
        return
    session.record(name, value, attributes)
