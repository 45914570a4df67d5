"""In-process OTLP receivers, so tests can see exactly what an exporter sent.

Both receivers keep every ExportMetricsServiceRequest they get and share one
set of query helpers (:class:`MetricsStore`), so a test reads the same way
whichever protocol the exporter under test speaks. They take OTLP log records
on the same endpoint too (the logs service over gRPC, ``/v1/logs`` over HTTP)
into ``receiver.logs`` (:class:`LogsStore`).
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric


class HistogramValue(NamedTuple):
    """Value of one explicit-bucket histogram data point."""

    count: int  # type: ignore[assignment]  # shadows tuple.count on purpose
    sum: float
    bucket_counts: tuple[int, ...]
    explicit_bounds: tuple[float, ...]


class Point(NamedTuple):
    """One data point: attributes plus a number or HistogramValue."""

    attributes: dict[str, Any]
    value: Any


def any_value(value: AnyValue) -> Any:
    """Convert an OTLP AnyValue into the matching Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_dict(value.kvlist_value.values)
    return getattr(value, kind)


def attributes_dict(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    """Convert repeated KeyValue into a plain dict."""
    return {kv.key: any_value(kv.value) for kv in attributes}


def metric_points(metric: Metric) -> list[Point]:
    """Data points of one metric, whatever its type."""
    kind = metric.WhichOneof("data")
    if kind in ("gauge", "sum"):
        return [
            Point(
                attributes_dict(dp.attributes), getattr(dp, dp.WhichOneof("value") or "as_double")
            )
            for dp in getattr(metric, kind).data_points
        ]
    if kind == "histogram":
        return [
            Point(
                attributes_dict(dp.attributes),
                HistogramValue(
                    dp.count, dp.sum, tuple(dp.bucket_counts), tuple(dp.explicit_bounds)
                ),
            )
            for dp in metric.histogram.data_points
        ]
    if kind in ("exponential_histogram", "summary"):
        # Tests only need the totals for these; the proto stays reachable via metrics().
        return [
            Point(attributes_dict(dp.attributes), (dp.count, dp.sum))
            for dp in getattr(metric, kind).data_points
        ]
    return []


def _iter_metrics(requests: Iterable[ExportMetricsServiceRequest]) -> Iterator[Metric]:
    for request in requests:
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                yield from scope_metrics.metrics


class MetricsStore:
    """Thread-safe record of received requests with query helpers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: list[ExportMetricsServiceRequest] = []
        self._headers: list[dict[str, str]] = []

    def record(self, request: ExportMetricsServiceRequest, headers: dict[str, str]) -> None:
        with self._cond:
            self._requests.append(request)
            self._headers.append(headers)
            self._cond.notify_all()

    @property
    def requests(self) -> list[ExportMetricsServiceRequest]:
        """Snapshot of all requests received so far."""
        with self._cond:
            return list(self._requests)

    @property
    def headers(self) -> list[dict[str, str]]:
        """Request headers (lower-cased names) / gRPC metadata, one dict per request."""
        with self._cond:
            return list(self._headers)

    def clear(self) -> None:
        with self._cond:
            self._requests.clear()
            self._headers.clear()

    def metrics(self, name: str) -> list[Metric]:
        """Every Metric message with this name, across requests (for unit/type checks)."""
        return [m for m in _iter_metrics(self.requests) if m.name == name]

    def metric_names(self) -> set[str]:
        return {m.name for m in _iter_metrics(self.requests)}

    def points(self, name: str) -> list[Point]:
        """Data points of a metric across requests, oldest first."""
        return [p for m in self.metrics(name) for p in metric_points(m)]

    def resource_attributes(self) -> list[dict[str, Any]]:
        """Resource attributes of every ResourceMetrics received."""
        return [
            attributes_dict(rm.resource.attributes)
            for request in self.requests
            for rm in request.resource_metrics
        ]

    def wait_for(self, names: Iterable[str], timeout: float = 10.0) -> bool:
        """Block until all names were received; False on timeout."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                received = {m.name for m in _iter_metrics(self._requests)}
                if wanted <= received:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)


class LogRecord(NamedTuple):
    """One received log record, flattened: what a test asserts on."""

    body: Any
    severity_number: int
    severity_text: str
    event_name: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    time_unix_nano: int


class LogsStore:
    """Thread-safe record of received ExportLogsServiceRequests."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: list[ExportLogsServiceRequest] = []

    def record(self, request: ExportLogsServiceRequest) -> None:
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    def records(self) -> list[LogRecord]:
        """Every log record received, oldest first."""
        with self._cond:
            requests = list(self._requests)
        return [LogRecord(any_value(record.body), record.severity_number, record.severity_text, record.event_name,
                          attributes_dict(record.attributes), attributes_dict(resource_logs.resource.attributes),
                          record.time_unix_nano)
                for request in requests for resource_logs in request.resource_logs
                for scope_logs in resource_logs.scope_logs for record in scope_logs.log_records]

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` records were received; False on timeout."""
        deadline = time.monotonic() + timeout
        while len(self.records()) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._cond:
                self._cond.wait(min(remaining, 0.05))
        return True


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, store: LogsStore) -> None:
        self._store = store

    def Export(  # noqa: N802 - name fixed by the generated service
        self, request: ExportLogsServiceRequest, context: grpc.ServicerContext
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        self._store.record(request)
        return logs_service_pb2.ExportLogsServiceResponse()


class _Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: MetricsStore) -> None:
        self._store = store

    def Export(  # noqa: N802 - name fixed by the generated service
        self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ExportMetricsServiceResponse:
        metadata = {key.lower(): str(value) for key, value in context.invocation_metadata()}
        self._store.record(request, metadata)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class GrpcMetricsReceiver(MetricsStore):
    """OTLP/gRPC metrics (and logs) endpoint on 127.0.0.1 (plaintext, use insecure=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.logs = LogsStore()
        self.port = 0
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` for OTLPMetricExporter(endpoint=..., insecure=True)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://host:port`` for OTEL_EXPORTER_OTLP_METRICS_ENDPOINT."""
        return f"http://{self.endpoint}"

    def __enter__(self) -> GrpcMetricsReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Servicer(self), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsServicer(self.logs), server)
        # Binding port 0 lets gRPC pick the port, so there is no race with other tests.
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None


def _decode_body(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/metrics", "/v1/logs"):
            self._reply(404, b"not found", "text/plain")
            return
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip()
        if path == "/v1/logs":
            self._receive_logs(body, content_type)
            return
        try:
            payload = _decode_body(body, self.headers.get("Content-Encoding") or "")
            request = ExportMetricsServiceRequest()
            if content_type == "application/x-protobuf":
                request.ParseFromString(payload)
            elif content_type == "application/json":
                json_format.Parse(payload, request)
            else:
                self._reply(415, b"unsupported content type", "text/plain")
                return
        except Exception as exc:  # malformed input is the client's problem
            self._reply(400, str(exc).encode(), "text/plain")
            return
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.server.store.record(request, headers)
        response = ExportMetricsServiceResponse()
        if content_type == "application/json":
            self._reply(200, json_format.MessageToJson(response).encode(), content_type)
        else:
            self._reply(200, response.SerializeToString(), content_type)

    def _receive_logs(self, body: bytes, content_type: str) -> None:
        if content_type != "application/x-protobuf":
            self._reply(415, b"unsupported content type", "text/plain")
            return
        request = ExportLogsServiceRequest()
        try:
            request.ParseFromString(_decode_body(body, self.headers.get("Content-Encoding") or ""))
        except Exception as exc:  # malformed input is the client's problem
            self._reply(400, str(exc).encode(), "text/plain")
            return
        self.server.store.logs.record(request)
        self._reply(200, logs_service_pb2.ExportLogsServiceResponse().SerializeToString(), content_type)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Keep test output clean."""


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: HttpMetricsReceiver) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.store = store


class HttpMetricsReceiver(MetricsStore):
    """OTLP/HTTP metrics endpoint (POST /v1/metrics, protobuf or JSON, gzip/deflate; /v1/logs, protobuf)."""

    def __init__(self) -> None:
        super().__init__()
        self.logs = LogsStore()
        self.port = 0
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """Full URL for OTLPMetricExporter(endpoint=...) / OTEL_EXPORTER_OTLP_METRICS_ENDPOINT."""
        return f"http://127.0.0.1:{self.port}/v1/metrics"

    @property
    def url(self) -> str:
        """Base URL, for OTEL_EXPORTER_OTLP_ENDPOINT (the SDK appends /v1/metrics)."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HttpMetricsReceiver:
        self._server = _HttpServer(self)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
