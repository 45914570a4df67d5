"""The MeterProvider: catalog Views, a Prometheus pull reader and an OTLP push reader.

Built so the export path can never hurt training:

* the Prometheus endpoint binds loopback unless configured, local rank k uses
  base port + k, and a port held by another process degrades to OTLP only with
  one warning (never a silent no-op provider);
* the OTLP exporter is wrapped so a forked child (DataLoader worker) never
  exports the parent's copied state;
* flushes touch the OTLP reader only (a provider-wide flush makes the
  Prometheus reader emit duplicate series), and shutdown is bounded in time,
  more tightly when the collector already failed (a stopping job must not wait
  on a collector that is down or never answers);
* while the OTLP exporter lives, its failures are logged at most once a minute
  per kind and the OTLP header values never reach a log (:mod:`otel_llm.export.log_limits`);
* the LoggerProvider of the anomaly log records (:mod:`otel_llm.export.events`)
  shares the resource, the rank policy, the flushes and the bounded shutdown.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from otel_llm.catalog import MetricSpec
from otel_llm.config import Config
from otel_llm.export import log_limits, prometheus
from otel_llm.export.events import build_logger_provider
from otel_llm.export.views import build_views
from otel_llm.runtime.rank import RankInfo, exports, rank_info

__all__ = ["ProviderBundle", "build_provider", "run_bounded"]

_logger = logging.getLogger(__name__)

RANK_RESOURCE_KEYS = ("llm.rank", "llm.world_size")
"""Resource attributes promoted to labels on every Prometheus series."""

FAILING_COLLECTOR_SHUTDOWN_SECONDS = 0.5
"""Shutdown bound when the collector already failed or has not answered yet: enough for a healthy one to
finish the export in flight and take the final push, which take milliseconds each."""


def run_bounded(action: Callable[[], object], timeout: float, what: str) -> bool:
    """Run ``action`` on a daemon thread and wait at most ``timeout`` seconds; never raises."""
    outcome: list[bool] = []

    def target() -> None:
        try:
            action()
            outcome.append(True)
        except Exception:  # noqa: BLE001 - exporters must not raise into training
            _logger.warning("otel_llm: %s failed", what, exc_info=True)
            outcome.append(False)

    worker = threading.Thread(target=target, name=f"otel_llm-{what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        _logger.warning("otel_llm: %s did not finish within %.1f s; abandoned", what, timeout)
        return False
    return bool(outcome and outcome[0])


class ForkSafeExporter(MetricExporter):
    """Delegates to ``inner`` only in the process that created it; forked children export nothing."""

    def __init__(self, inner: MetricExporter) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self._inner = inner
        self._pid = os.getpid()
        self.last_result: MetricExportResult | None = None
        """Outcome of the latest export, so a flush can say whether anything arrived."""
        self._exporting = False

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object) -> MetricExportResult:
        if os.getpid() != self._pid:
            return MetricExportResult.SUCCESS
        self._exporting = True
        try:
            with log_limits.export_scope():
                self.last_result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        finally:
            self._exporting = False
        return self.last_result

    def collector_failing(self) -> bool:
        """True when the latest export failed or one is still in flight.

        Asked at shutdown, where an export still waiting is itself the sign: a
        healthy collector answers within milliseconds, and how long the wait has
        lasted so far depends only on when the loop happened to end.
        """
        return self.last_result is MetricExportResult.FAILURE or self._exporting

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return os.getpid() != self._pid or self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        if os.getpid() == self._pid:
            self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _otlp_exporter() -> MetricExporter:
    """The SDK's OTLP metric exporter for the configured protocol, built with the export-path log filter on.

    The filter goes on first because the exporter's constructor already logs
    (a malformed ``OTEL_EXPORTER_OTLP_HEADERS`` entry, verbatim); the bundle takes
    it off at shutdown.
    """
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if protocol not in ("grpc", "http/protobuf"):
        _logger.warning("otel_llm: unsupported OTLP protocol %r; using grpc", protocol)
        protocol = "grpc"
    build: Callable[[], MetricExporter]
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        build = GrpcExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        from otel_llm.export.otlp_http import pinned_session_if_configured

        def build() -> MetricExporter:
            return HttpExporter(session=pinned_session_if_configured())
    log_limits.attach()
    try:
        return build()
    except BaseException:
        log_limits.detach()
        raise


_COMMAND_LINE_KEYS = ("process.command", "process.command_args", "process.command_line")
"""Never exported: training jobs pass tokens on their command line (older SDKs' process detector sends it)."""


def build_resource(config: Config, ranks: RankInfo) -> Resource:
    """service.name (OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win), llm.rank, llm.world_size; no command line."""
    resource = Resource.create({"llm.rank": ranks.rank, "llm.world_size": ranks.world_size})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": config.service_name}))
    kept = {key: value for key, value in resource.attributes.items() if key not in _COMMAND_LINE_KEYS}
    return Resource(kept, resource.schema_url)


@dataclass
class ProviderBundle:
    """A MeterProvider and the readers otel_llm attached to it."""

    provider: MeterProvider
    otlp_reader: MetricReader | None = None
    otlp_exporter: ForkSafeExporter | None = None
    prometheus_endpoint: tuple[str, int] | None = None
    logger_provider: LoggerProvider | None = None
    """Exports the anomaly log records; None unless OTEL_LOGS_EXPORTER names an exporter."""
    _closed: bool = False

    @property
    def prometheus_url(self) -> str | None:
        """``http://host:port/metrics`` of the pull endpoint, when one is served."""
        if self.prometheus_endpoint is None:
            return None
        host, port = self.prometheus_endpoint
        return f"http://{host}:{port}/metrics"

    def flush(self, timeout: float) -> bool:
        """Push the OTLP reader (never the Prometheus one) and the log records now, within ``timeout`` seconds.

        True if everything arrived.
        """
        if self._closed:
            return True
        reader, logs = self.otlp_reader, self.logger_provider
        if reader is None and logs is None:
            return True
        millis = timeout * 1000
        outcome: list[bool] = []

        def push() -> None:
            if reader is not None:
                outcome.append(reader.force_flush(timeout_millis=millis))
            if logs is not None:
                outcome.append(logs.force_flush(timeout_millis=int(millis)))

        done = run_bounded(push, timeout, "flush") and all(outcome)
        exporter = self.otlp_exporter
        return done and (exporter is None or exporter.last_result is not MetricExportResult.FAILURE)

    def shutdown(self, timeout: float) -> bool:
        """Final OTLP push and reader shutdown, bounded by ``timeout`` seconds; idempotent.

        When the collector already failed, the bound is at most
        ``FAILING_COLLECTOR_SHUTDOWN_SECONDS``: a process exiting or stopped by
        SIGTERM would otherwise spend the whole timeout on a push that cannot land.
        """
        if self._closed:
            return True
        self._closed = True
        provider, logs = self.provider, self.logger_provider
        owns_log_filter = self.otlp_exporter is not None
        if self.otlp_exporter is not None and self.otlp_exporter.collector_failing():
            timeout = min(timeout, FAILING_COLLECTOR_SHUTDOWN_SECONDS)

        def close() -> None:
            try:
                provider.shutdown(timeout_millis=timeout * 1000)
                if logs is not None:
                    logs.shutdown()
            finally:  # only once the exporters are done, however long an abandoned one takes
                if owns_log_filter:
                    log_limits.detach()
                if logs is not None:
                    log_limits.detach()

        done = run_bounded(close, timeout, "shutdown")
        if self.prometheus_endpoint is not None:
            prometheus.release(*self.prometheus_endpoint)
        return done


def _prometheus_reader(config: Config, ranks: RankInfo) -> tuple[MetricReader, tuple[str, int]] | None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    port = config.prometheus_port + ranks.local_rank if config.prometheus_port else 0
    try:
        bound = prometheus.acquire(config.prometheus_host, port)
    except OSError as exc:
        _logger.warning(
            "otel_llm: cannot serve Prometheus on %s:%d (%s); exporting through OTLP only. "
            "Set OTEL_EXPORTER_PROMETHEUS_PORT to a free base port (local rank k uses base + k).",
            config.prometheus_host, port, exc.strerror or exc)
        return None
    reader = PrometheusMetricReader(resource_attribute_filter=lambda key: key in RANK_RESOURCE_KEYS)
    return reader, (config.prometheus_host, bound)


def build_provider(config: Config, extra_specs: Iterable[MetricSpec] = (),
                   extra_readers: Iterable[MetricReader] = ()) -> ProviderBundle:
    """A MeterProvider with catalog Views and the readers ``config.exporters`` selects.

    ``extra_readers`` (e.g. an InMemoryMetricReader in tests) are attached as well.
    """
    ranks = rank_info()
    readers: list[MetricReader] = list(extra_readers)
    exporters = config.exporters if exports(ranks, config.export_ranks) else ()
    otlp_reader = None
    otlp_exporter = None
    endpoint = None
    if "prometheus" in exporters:
        served = _prometheus_reader(config, ranks)
        if served is not None:
            readers.append(served[0])
            endpoint = served[1]
    if "otlp" in exporters:
        otlp_exporter = ForkSafeExporter(_otlp_exporter())
        otlp_reader = PeriodicExportingMetricReader(otlp_exporter, export_interval_millis=config.export_interval_ms)
        readers.append(otlp_reader)
    resource = build_resource(config, ranks)
    provider = MeterProvider(metric_readers=readers, resource=resource,
                             views=build_views(config, extra_specs), shutdown_on_exit=False)
    logs = None
    if config.logs_exporters and exports(ranks, config.export_ranks):
        log_limits.attach()  # before the exporters exist: their constructors may already log a header
        try:
            logs = build_logger_provider(config.logs_exporters, resource)
        except BaseException:
            log_limits.detach()
            raise
    return ProviderBundle(provider, otlp_reader, otlp_exporter, endpoint, logs)
