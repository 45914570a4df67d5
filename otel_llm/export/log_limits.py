"""Keep the OTLP export path from flooding the logs or printing the OTLP headers.

With the collector down, the SDK's OTLP exporters log a warning for every retry
and an error for every failed export (a dozen lines a minute at the default
interval, many more with a short one), which buries a training job's own log.
And the SDK's header parser logs a malformed ``OTEL_EXPORTER_OTLP_HEADERS``
entry verbatim, e.g. ``Authorization: Bearer <token>`` written with a colon.

:class:`ExportLogFilter` sits on the export path's loggers while otel_llm owns
an OTLP exporter. Warnings and errors emitted *inside otel_llm's own export
call* (:func:`export_scope`) are rate-limited per message template: the first
one passes, then at most one per minute, carrying the count of those held back.
Everything else on those loggers (another exporter of the process, DEBUG/INFO)
passes untouched, except that the values of the OTLP header variables are
replaced by ``[redacted]`` in every record.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import unquote

__all__ = ["ExportLogFilter", "attach", "detach", "export_scope", "header_secrets"]

EXPORT_PATH_LOGGER_PREFIXES = ("opentelemetry.exporter.otlp", "opentelemetry.exporter.http",
                               "opentelemetry.sdk.metrics", "opentelemetry.sdk._logs",
                               "opentelemetry.sdk._shared_internal", "opentelemetry.util.re",
                               "otel_llm.export.provider")
"""Loggers the filter is attached to (every existing logger whose name starts with one of these)."""

HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
                    "OTEL_EXPORTER_OTLP_LOGS_HEADERS")
REDACTED = "[redacted]"
_MIN_SECRET_LENGTH = 4
"""Shorter header values are left alone: redacting "1" or "on" would mangle every number and word."""
_HEADER_SEPARATOR = re.compile(r"[ \t]*,[ \t]*")  # the SDK's own split, so each item matches its log line

_scope = threading.local()


@contextmanager
def export_scope() -> Iterator[None]:
    """Mark log records emitted on this thread meanwhile as coming from otel_llm's OTLP export."""
    _scope.depth = getattr(_scope, "depth", 0) + 1
    try:
        yield
    finally:
        _scope.depth -= 1


def _in_export_scope() -> bool:
    return getattr(_scope, "depth", 0) > 0


def header_secrets(environ: Mapping[str, str] = os.environ) -> set[str]:
    """Header values (raw and URL-decoded) and malformed header items of the OTLP header variables."""
    secrets: set[str] = set()
    for variable in HEADER_VARIABLES:
        for item in _HEADER_SEPARATOR.split(environ.get(variable, "").strip()):
            _, has_value, value = item.partition("=")
            candidates = (value.strip(), unquote(value).strip()) if has_value else (item.strip(),)
            secrets.update(c for c in candidates if len(c) >= _MIN_SECRET_LENGTH)
    return secrets


class ExportLogFilter(logging.Filter):
    """Rate-limits otel_llm's export-path warnings per template and redacts OTLP header values."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self.secrets: set[str] = set()
        self._lock = threading.Lock()
        self._last_passed: dict[tuple[str, str], float] = {}
        self._held_back: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and _in_export_scope():
            held_back = self._admit((record.name, str(record.msg)))
            if held_back is None:
                return False
            if held_back:
                record.msg = (f"{record.msg} [otel_llm: {held_back} more like this in the last "
                              f"{self.interval:g} s were not logged]")
        self._redact(record)
        return True

    def _admit(self, key: tuple[str, str]) -> int | None:
        """None to drop the record; otherwise how many of its kind were dropped since one last passed."""
        now = time.monotonic()
        with self._lock:
            last = self._last_passed.get(key)
            if last is not None and now - last < self.interval:
                self._held_back[key] = self._held_back.get(key, 0) + 1
                return None
            self._last_passed[key] = now
            return self._held_back.pop(key, 0)

    def _redact(self, record: logging.LogRecord) -> None:
        secrets = sorted(self.secrets, key=len, reverse=True)  # replaced, never mutated: safe to read unlocked
        if not secrets:
            return

        def scrub(text: str) -> str:
            for secret in secrets:
                text = text.replace(secret, REDACTED)
            return text

        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is the handler's to report, not ours
            return
        if scrub(message) != message:
            record.msg, record.args = scrub(message), None
        if record.exc_info:
            trace = logging.Formatter().formatException(record.exc_info)
            if scrub(trace) != trace:
                record.exc_info, record.exc_text = None, scrub(trace)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)


_filter = ExportLogFilter()
_lock = threading.Lock()
_users = 0
_attached: list[logging.Logger] = []


def _export_path_loggers() -> list[logging.Logger]:
    return [logger for name, logger in list(logging.Logger.manager.loggerDict.items())
            if isinstance(logger, logging.Logger) and name.startswith(EXPORT_PATH_LOGGER_PREFIXES)]


def attach() -> None:
    """Put the filter on the export path's loggers; call after importing the exporter, before building it."""
    global _users
    with _lock:
        _users += 1
        _filter.secrets = _filter.secrets | header_secrets()
        for logger in _export_path_loggers():
            if _filter not in logger.filters:
                logger.addFilter(_filter)
                _attached.append(logger)


def detach() -> None:
    """Undo one :func:`attach`; the last one takes the filter off every logger it was put on."""
    global _users
    with _lock:
        _users -= 1
        if _users > 0:
            return
        for logger in _attached:
            logger.removeFilter(_filter)
        _attached.clear()
        _filter.secrets = set()
