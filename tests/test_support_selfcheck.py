"""Checks that the test helpers in tests/support behave, so other tests can trust them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpExporter,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tests.support.backends import Prometheus, VictoriaMetrics, promtool_check_metrics
from tests.support.receivers import (
    GrpcMetricsReceiver,
    HistogramValue,
    HttpMetricsReceiver,
    MetricsStore,
)

NAMES = {"llm.train.tokens", "llm.train.loss", "llm.step.duration"}


def _record_and_flush(exporter: MetricExporter) -> None:
    """Record one counter, gauge and histogram through the real SDK and export them."""
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=60_000)
    provider = MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({"service.name": "selfcheck", "run.id": "r1"}),
    )
    try:
        meter = provider.get_meter("otel_llm.selfcheck")
        meter.create_counter("llm.train.tokens", unit="{token}").add(128, {"rank": 0})
        meter.create_gauge("llm.train.loss").set(2.5, {"rank": 0})
        histogram = meter.create_histogram("llm.step.duration", unit="s")
        for seconds in (0.2, 3.0):
            histogram.record(seconds)
        assert provider.force_flush(timeout_millis=10_000)
    finally:
        provider.shutdown(timeout_millis=5_000)


def _check_received(receiver: MetricsStore) -> None:
    assert receiver.wait_for(NAMES, timeout=5)
    assert receiver.metric_names() >= NAMES
    assert receiver.points("llm.train.tokens")[0] == ({"rank": 0}, 128)
    assert receiver.points("llm.train.loss")[0] == ({"rank": 0}, 2.5)
    (_, hist), *_ = receiver.points("llm.step.duration")
    assert isinstance(hist, HistogramValue)
    assert hist.count == 2
    assert hist.sum == pytest.approx(3.2)
    assert sum(hist.bucket_counts) == 2
    assert len(hist.bucket_counts) == len(hist.explicit_bounds) + 1
    assert receiver.metrics("llm.step.duration")[0].unit == "s"
    resource = receiver.resource_attributes()[0]
    assert resource["service.name"] == "selfcheck"
    assert resource["run.id"] == "r1"


def test_grpc_receiver_gets_sdk_export() -> None:
    with GrpcMetricsReceiver() as receiver:
        _record_and_flush(GrpcExporter(endpoint=receiver.endpoint, insecure=True, timeout=5))
        _check_received(receiver)
        assert "user-agent" in receiver.headers[0]


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_http_receiver_gets_sdk_export(compression: Compression) -> None:
    with HttpMetricsReceiver() as receiver:
        _record_and_flush(
            HttpExporter(endpoint=receiver.endpoint, compression=compression, timeout=5)
        )
        _check_received(receiver)
        if compression is Compression.Gzip:
            assert receiver.headers[0]["content-encoding"] == "gzip"


def test_wait_for_times_out_on_missing_metric() -> None:
    with HttpMetricsReceiver() as receiver:
        start = time.monotonic()
        assert not receiver.wait_for({"never.sent"}, timeout=0.2)
        assert time.monotonic() - start < 2


VALID_EXPOSITION = """\
# HELP llm_train_loss Training loss.
# TYPE llm_train_loss gauge
llm_train_loss{rank="0"} 2.5
# HELP llm_train_tokens_total Tokens processed.
# TYPE llm_train_tokens_total counter
llm_train_tokens_total{rank="0"} 128
"""

# A counter without the _total suffix is flagged by promtool's lint.
LINT_FAILING_EXPOSITION = """\
# HELP llm_train_tokens Tokens processed.
# TYPE llm_train_tokens counter
llm_train_tokens 128
"""

MALFORMED_EXPOSITION = "llm_train_loss{rank=0} 2.5\n"


def test_promtool_accepts_valid_exposition() -> None:
    code, output = promtool_check_metrics(VALID_EXPOSITION)
    assert code == 0, output


@pytest.mark.parametrize(
    "text", [LINT_FAILING_EXPOSITION, MALFORMED_EXPOSITION], ids=["lint", "malformed"]
)
def test_promtool_rejects_bad_exposition(text: str) -> None:
    code, output = promtool_check_metrics(text)
    assert code != 0
    assert output.strip()


@pytest.fixture(scope="module")
def victoria_metrics() -> Iterator[VictoriaMetrics]:
    with VictoriaMetrics() as vm:
        yield vm


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _otlp_request() -> ExportMetricsServiceRequest:
    """A gauge and a cumulative counter, as an exporter would send them."""
    now = time.time_ns()
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    resource_metrics.resource.attributes.append(_kv("service.name", "selfcheck-proto"))
    metrics = resource_metrics.scope_metrics.add().metrics

    loss = metrics.add(name="llm.train.loss")
    point = loss.gauge.data_points.add(time_unix_nano=now, as_double=2.5)
    point.attributes.append(_kv("rank", "0"))

    tokens = metrics.add(name="llm.train.tokens", unit="{token}")
    tokens.sum.is_monotonic = True
    tokens.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    tokens.sum.data_points.add(time_unix_nano=now, start_time_unix_nano=now - 10**9, as_int=128)
    return request


def test_victoria_metrics_ingests_otlp(victoria_metrics: VictoriaMetrics) -> None:
    victoria_metrics.push_otlp(_otlp_request().SerializeToString())
    assert victoria_metrics.wait_for({"llm_train_loss", "llm_train_tokens_total"}, timeout=5)
    (loss,) = victoria_metrics.query('llm_train_loss{service_name="selfcheck-proto"}')
    assert loss["metric"] == {
        "__name__": "llm_train_loss",
        "rank": "0",
        "service_name": "selfcheck-proto",
    }
    assert float(loss["value"][1]) == 2.5
    (tokens,) = victoria_metrics.query('llm_train_tokens_total{service_name="selfcheck-proto"}')
    assert float(tokens["value"][1]) == 128


def test_victoria_metrics_ingests_sdk_export(victoria_metrics: VictoriaMetrics) -> None:
    _record_and_flush(HttpExporter(endpoint=victoria_metrics.otlp_http_endpoint, timeout=5))
    expected = {
        "llm_train_loss",
        "llm_train_tokens_total",
        "llm_step_duration_seconds_bucket",
    }
    assert victoria_metrics.wait_for(expected, timeout=5)
    (bucket,) = victoria_metrics.query(
        'llm_step_duration_seconds_bucket{service_name="selfcheck", le="+Inf"}'
    )
    assert float(bucket["value"][1]) == 2
    (loss,) = victoria_metrics.query('llm_train_loss{service_name="selfcheck"}')
    assert loss["metric"]["run_id"] == "r1"


class _ExpositionHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        body = VALID_EXPOSITION.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Keep test output clean."""


@pytest.mark.slow  # Prometheus hands discovered targets to the scraper only every 5 s
def test_prometheus_scrapes_exposition() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ExpositionHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = f"""\
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: trainer
    static_configs:
      - targets: ["127.0.0.1:{server.server_address[1]}"]
"""
    try:
        with Prometheus(config) as prometheus:
            assert prometheus.wait_for({"llm_train_loss"}, timeout=10), prometheus.log_tail()
            (loss,) = prometheus.query("llm_train_loss")
            assert loss["metric"]["job"] == "trainer"
            assert float(loss["value"][1]) == 2.5
    finally:
        server.shutdown()
        server.server_close()
