"""Zero-code wiring for ``opentelemetry-instrument``: a configurator and a distro.

The configurator builds the MeterProvider with the catalog Views (Prometheus +
OTLP readers per ``OTEL_METRICS_EXPORTER``) and makes it the global provider,
so metrics the script records itself share the schema. The distro only asks for
that configurator when opentelemetry-distro is installed too. If another
configurator won anyway, the instrumentor builds otel_llm's own provider.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import metrics
from opentelemetry.instrumentation.distro import BaseDistro  # type: ignore[attr-defined]  # not in its __all__
from opentelemetry.sdk._configuration import _BaseConfigurator

from otel_llm.catalog import MetricSpec
from otel_llm.config import Config
from otel_llm.export.provider import ProviderBundle, build_provider
from otel_llm.runtime.log_once import once
from otel_llm.runtime.rank import is_launcher
from otel_llm.schema import SchemaError, load_schema

__all__ = ["OtelLlmConfigurator", "OtelLlmDistro", "take_configured_bundle", "zero_code_schema"]

_logger = logging.getLogger(__name__)
_configured: ProviderBundle | None = None


class OtelLlmConfigurator(_BaseConfigurator):
    """Builds otel_llm's MeterProvider and sets it as the global one."""

    def _configure(self, **kwargs: object) -> None:
        global _configured
        if is_launcher():  # `opentelemetry-instrument torchrun ...`: only the workers train and export
            return
        config = Config()
        _configured = build_provider(config, zero_code_schema(config))
        metrics.set_meter_provider(_configured.provider)


class OtelLlmDistro(BaseDistro):
    """Selects the otel_llm configurator unless the user chose one."""

    def _configure(self, **kwargs: object) -> None:
        os.environ.setdefault("OTEL_PYTHON_CONFIGURATOR", "otel_llm")


def zero_code_schema(config: Config) -> tuple[MetricSpec, ...]:
    """The schema file's metrics; a broken file is one error line, and the run exports everything else.

    Under ``opentelemetry-instrument`` nothing could catch a SchemaError: the
    launcher swallows the configurator's and the script would die of the
    instrumentor's. Both call this; the line is given once.
    """
    if not config.schema_path:
        return ()
    try:
        return load_schema(config.schema_path)
    except SchemaError as exc:
        once(_logger, logging.ERROR, ("schema", str(exc)),
             "%s; exporting the built-in metrics without the file's (fix OTEL_LLM_SCHEMA)", exc)
        return ()


def take_configured_bundle() -> ProviderBundle | None:
    """The provider the configurator built, handed over once to the instrumentor's session."""
    global _configured
    bundle, _configured = _configured, None
    return bundle


def note_foreign_provider() -> None:
    """Say once why otel_llm exports through a provider of its own."""
    from opentelemetry.sdk.metrics import MeterProvider

    if isinstance(metrics.get_meter_provider(), MeterProvider):
        _logger.info("otel_llm: another configurator set the global MeterProvider; otel_llm exports through "
                     "its own provider with the catalog Views (set OTEL_PYTHON_CONFIGURATOR=otel_llm to share one)")
