"""``TorchInstrumentor``: the ``opentelemetry_instrumentor`` entry point.

``opentelemetry-instrument python train.py`` calls ``instrument()`` with no
arguments before the script runs; global optimizer-step hooks and the
cross_entropy interceptor then find the optimizer, model and loss as they
first run, so the script needs no change.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]  # not in its __all__

from otel_llm.config import Config
from otel_llm.runtime.rank import is_launcher
from otel_llm.session import Instrumentation
from otel_llm.zero_code import distro

__all__ = ["TorchInstrumentor"]

_logger = logging.getLogger(__name__)

_instruments = ("torch >= 2.4",)


class TorchInstrumentor(BaseInstrumentor):
    """Instruments torch training globally; ``uninstrument()`` removes every hook it added."""

    _session: Instrumentation | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        if is_launcher():  # torchrun's launcher process: its workers are instrumented, not it
            return
        config = kwargs.get("config") or Config()
        meter_provider = kwargs.get("meter_provider")
        bundle = distro.take_configured_bundle() if meter_provider is None else None
        if meter_provider is None and bundle is None:
            distro.note_foreign_provider()
        schema = None if bundle is not None else distro.zero_code_schema(config)  # a bundle carries its own
        self._session = Instrumentation(kwargs.get("model"), kwargs.get("optimizer"), config=config,
                                        meter_provider=meter_provider, bundle=bundle, schema=schema)
        if self._session.prometheus_url:
            _logger.info("otel_llm: serving metrics on %s", self._session.prometheus_url)

    def _uninstrument(self, **kwargs: Any) -> None:
        if self._session is not None:
            self._session.shutdown()
            self._session = None

    @property
    def session(self) -> Instrumentation | None:
        """The running session, if instrumented."""
        return self._session
