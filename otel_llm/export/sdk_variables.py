"""The standard OTEL_* variables the SDK would read itself, validated first and passed explicitly.

Left to the SDK, ``OTEL_EXPORTER_OTLP_TIMEOUT=banana`` (gRPC),
``OTEL_EXPORTER_OTLP_COMPRESSION=zip``, ``OTEL_EXPORTER_OTLP_ENDPOINT=http://[::1``
or ``OTEL_METRICS_EXEMPLAR_FILTER=banana`` raise from a constructor, which stops
``instrument()`` and, under ``opentelemetry-instrument``, leaves the run without
telemetry. Here each is read through :func:`otel_llm.config.environment_value`:
a bad value is logged once with the variable, the value and what is used
instead, and the exporter gets the result as an argument, so the SDK never
parses the variable. The precedence is the SDK's: the ``_METRICS_`` variable,
then the general one, then the default.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_COMPRESSION,
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_COMPRESSION,
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    OTEL_EXPORTER_OTLP_METRICS_TIMEOUT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TIMEOUT,
    OTEL_METRICS_EXEMPLAR_FILTER,
)
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    ExemplarFilter,
    TraceBasedExemplarFilter,
)

from otel_llm.config import MAX_SECONDS, _at_most, _choice, _positive_float, _shown, environment_value

__all__ = ["OtlpArguments", "exemplar_filter", "otlp_arguments", "otlp_protocol"]

OtlpArguments = dict[str, Any]
"""Keyword arguments for the SDK's OTLP metric exporter: ``endpoint``, ``timeout``, ``compression``."""

_GRPC_DEFAULT = "http://localhost:4317"
_HTTP_DEFAULT_BASE = "http://localhost:4318"
_HTTP_PATH = "v1/metrics"
_TARGET = re.compile(r"^[^\s/]+$")
_timeout = _at_most(MAX_SECONDS, _positive_float)


def _url(value: Any, name: str) -> str:
    """An ``http://`` or ``https://`` URL with a host and, if given, a port in range."""
    text = str(value).strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"{name} is not a valid URL ({exc}), got {_shown(value)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or len(text) > 2048:
        raise ValueError(f"{name} must be an http:// or https:// URL with a host, got {_shown(value)}")
    return text


def _grpc_target(value: Any, name: str) -> str:
    """A URL as for HTTP, or a bare gRPC target such as ``collector:4317``."""
    text = str(value).strip()
    if "://" in text or not _TARGET.match(text):
        return _url(text, name)
    _url(f"http://{text}", name)  # the same host and port rules
    return text


def otlp_protocol() -> str:
    """``grpc`` or ``http/protobuf`` (the Python SDK has no other)."""
    parse = _choice("grpc", "http/protobuf")
    general = environment_value(OTEL_EXPORTER_OTLP_PROTOCOL, parse, "grpc")[0]
    return str(environment_value(OTEL_EXPORTER_OTLP_METRICS_PROTOCOL, parse, general)[0])


def _resolved(specific: str, general: str, parse: Any, default: Any) -> Any:
    return environment_value(specific, parse, environment_value(general, parse, default)[0])[0]


def otlp_arguments(protocol: str) -> OtlpArguments:
    """The exporter's endpoint, timeout (seconds) and compression, each validated."""
    timeout = _resolved(OTEL_EXPORTER_OTLP_METRICS_TIMEOUT, OTEL_EXPORTER_OTLP_TIMEOUT, _timeout, 10.0)
    if protocol == "grpc":
        from grpc import Compression as GrpcCompression

        endpoint = _resolved(OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT, _grpc_target,
                             _GRPC_DEFAULT)
        name = _resolved(OTEL_EXPORTER_OTLP_METRICS_COMPRESSION, OTEL_EXPORTER_OTLP_COMPRESSION,
                         _choice("none", "gzip"), "none")
        compression: Any = GrpcCompression.Gzip if name == "gzip" else GrpcCompression.NoCompression
    else:
        from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression

        base = environment_value(OTEL_EXPORTER_OTLP_ENDPOINT, _url, _HTTP_DEFAULT_BASE)[0]
        endpoint = environment_value(OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, _url,
                                     f"{base.removesuffix('/')}/{_HTTP_PATH}")[0]
        compression = HttpCompression(_resolved(OTEL_EXPORTER_OTLP_METRICS_COMPRESSION, OTEL_EXPORTER_OTLP_COMPRESSION,
                                                _choice("none", "gzip", "deflate"), "none"))
    return {"endpoint": endpoint, "timeout": timeout, "compression": compression}


def exemplar_filter() -> ExemplarFilter:
    """The MeterProvider's exemplar filter (``trace_based`` unless ``OTEL_METRICS_EXEMPLAR_FILTER`` says otherwise)."""
    name = environment_value(OTEL_METRICS_EXEMPLAR_FILTER, _choice("trace_based", "always_on", "always_off"),
                             "trace_based")[0]
    filters: dict[str, type[ExemplarFilter]] = {"always_on": AlwaysOnExemplarFilter,
                                                "always_off": AlwaysOffExemplarFilter}
    return filters.get(name, TraceBasedExemplarFilter)()
