"""Anomaly events and guard actions as OpenTelemetry log records, so a dashboard can show them as annotations.

``OTEL_LOGS_EXPORTER`` selects the exporters the way the SDK's own configuration
does: unset or ``none`` exports no records; a comma list names entry points of
the ``opentelemetry_logs_exporter`` group (``otlp``, ``otlp_proto_grpc``,
``otlp_proto_http``, ``console``), with ``otlp`` following
``OTEL_EXPORTER_OTLP_LOGS_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL`` (gRPC when
neither is set). Records go through a BatchLogRecordProcessor, so a slow collector
never holds up the exporter thread; a forked child (DataLoader worker) exports
nothing; the OTLP exporters' warnings pass the same rate limit and header
redaction as the metric exporter's (:mod:`otel_llm.export.log_limits`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from importlib.metadata import entry_points

from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.resources import Resource

from otel_llm.catalog import ATTR_ANOMALY_SCORE, ATTR_ANOMALY_THRESHOLD, ATTR_GUARD_ACTION, ATTR_SIGNAL, ATTR_STEP
from otel_llm.export import log_limits
from otel_llm.guards.action import GuardAction
from otel_llm.pipeline.anomaly import Anomaly
from otel_llm.version import __version__

__all__ = ["EVENT_NAME", "EXPORTER_GROUP", "GUARD_EVENT_NAME", "AnomalyLog", "GuardLog", "build_logger_provider",
           "known_exporters"]

EVENT_NAME = "llm.anomaly"
"""``event_name`` of every anomaly record."""
GUARD_EVENT_NAME = "llm.guard"
"""``event_name`` of every guard-action record."""
EXPORTER_GROUP = "opentelemetry_logs_exporter"
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def known_exporters() -> set[str]:
    """Names ``OTEL_LOGS_EXPORTER`` may list: the installed entry points of the logs-exporter group."""
    return {entry.name for entry in entry_points(group=EXPORTER_GROUP)}


def _resolve(name: str) -> str:
    """``otlp`` becomes the protocol's exporter, as the SDK's configuration resolves it."""
    if name != "otlp":
        return name
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip().lower()
    return _OTLP_BY_PROTOCOL.get(protocol, "otlp_proto_grpc")


class ForkSafeLogExporter(LogRecordExporter):
    """Delegates to ``inner`` only in the process that created it, inside the export-path log scope."""

    def __init__(self, inner: LogRecordExporter) -> None:
        self._inner = inner
        self._pid = os.getpid()

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        if os.getpid() != self._pid:
            return LogRecordExportResult.SUCCESS
        with log_limits.export_scope():
            return self._inner.export(batch)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return os.getpid() != self._pid or self._inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        if os.getpid() == self._pid:
            self._inner.shutdown()


def build_logger_provider(names: Sequence[str], resource: Resource) -> LoggerProvider | None:
    """A LoggerProvider exporting to each named exporter, or None when no exporter is named.

    Attach :mod:`log_limits` first when the caller wants the exporters' construction filtered too.
    """
    if not names:
        return None
    classes = {entry.name: entry for entry in entry_points(group=EXPORTER_GROUP)}
    provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
    for name in dict.fromkeys(_resolve(name) for name in names):
        exporter = classes[name].load()()
        provider.add_log_record_processor(BatchLogRecordProcessor(ForkSafeLogExporter(exporter)))
    return provider


class AnomalyLog:
    """Writes each anomaly as one WARN log record with the signal, the series' attributes, step, score, threshold."""

    def __init__(self, provider: LoggerProvider) -> None:
        self._logger = provider.get_logger("otel_llm", __version__)

    def emit(self, anomaly: Anomaly, threshold: float) -> None:
        series = "".join(f" {key}={value}" for key, value in sorted(anomaly.attributes.items()))
        self._logger.emit(
            timestamp=time.time_ns(), severity_number=SeverityNumber.WARN, severity_text="WARN",
            event_name=EVENT_NAME,
            body=f"anomaly in {anomaly.signal}{series} at step {anomaly.step}: score {anomaly.score:.3g} "
                 f"> {threshold:g}",
            attributes={**anomaly.attributes, ATTR_SIGNAL: anomaly.signal, ATTR_STEP: anomaly.step,
                        ATTR_ANOMALY_SCORE: anomaly.score, ATTR_ANOMALY_THRESHOLD: threshold})


class GuardLog:
    """Writes each guard action as one WARN log record: the guard, the step, the reason and the values."""

    def __init__(self, provider: LoggerProvider) -> None:
        self._logger = provider.get_logger("otel_llm", __version__)

    def emit(self, action: GuardAction) -> None:
        self._logger.emit(
            timestamp=time.time_ns(), severity_number=SeverityNumber.WARN, severity_text="WARN",
            event_name=GUARD_EVENT_NAME, body=action.describe(),
            attributes={**{f"llm.guard.{key}": value for key, value in action.values.items()},
                        ATTR_GUARD_ACTION: action.action, ATTR_STEP: action.step})
