"""The MeterProvider: catalog Views, a Prometheus pull reader and an OTLP push reader.

Built so the export path can never hurt training:

* the Prometheus endpoint binds loopback unless configured, local rank k uses
  base port + k, and an endpoint that cannot be served (a port held by another
  process, a host that does not resolve) costs that reader alone, with one
  warning saying what is left (never a silent no-op provider);
* the standard OTLP variables are validated before the SDK sees them
  (:mod:`otel_llm.export.sdk_variables`), and an exporter that still cannot be
  built costs the OTLP reader alone;
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
import time
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
from otel_llm.export.sdk_variables import exemplar_filter, otlp_arguments, otlp_protocol
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


def _otlp_exporter() -> MetricExporter | None:
    """The SDK's OTLP metric exporter for the configured protocol, built with the export-path log filter on.

    The filter goes on first because the exporter's constructor already logs
    (a malformed ``OTEL_EXPORTER_OTLP_HEADERS`` entry, verbatim); the bundle takes
    it off at shutdown. Endpoint, timeout and compression are validated here
    (:mod:`otel_llm.export.sdk_variables`); a constructor that raises all the same
    (a setting otel_llm does not read) costs the OTLP reader, never the run.
    """
    protocol = otlp_protocol()
    arguments = otlp_arguments(protocol)
    build: Callable[[], MetricExporter]
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        def build() -> MetricExporter:
            return GrpcExporter(**arguments)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        from otel_llm.export.otlp_http import pinned_session_if_configured

        def build() -> MetricExporter:
            return HttpExporter(session=pinned_session_if_configured(), **arguments)
    log_limits.attach()
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - a bad setting must not stop training
        log_limits.detach()
        _logger.warning("otel_llm: cannot build the OTLP exporter (%s: %s); OTLP export is off for this run",
                        type(exc).__name__, exc)
        return None
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
    schema: tuple[MetricSpec, ...] = ()
    """The user metrics the Views were built for: a session on this provider records exactly these."""
    logger_provider: LoggerProvider | None = None
    """Exports the anomaly log records; None unless OTEL_LOGS_EXPORTER names an exporter."""
    _closed: bool = False

    @property
    def prometheus_url(self) -> str | None:
        """``http://host:port/metrics`` of the pull endpoint (an IPv6 host in brackets), when one is served."""
        if self.prometheus_endpoint is None:
            return None
        return f"http://{prometheus.address(*self.prometheus_endpoint)}/metrics"

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

        started = time.monotonic()
        if self.prometheus_endpoint is not None:  # first: it takes milliseconds, the final push may take the rest
            prometheus.release(*self.prometheus_endpoint)
        return run_bounded(close, max(0.01, timeout - (time.monotonic() - started)), "shutdown")


def _prometheus_reader(config: Config, ranks: RankInfo, left: str) -> tuple[MetricReader, tuple[str, int]] | None:
    """The pull reader and its endpoint; None, with one warning saying what is ``left``, when none can be served."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    endpoint = prometheus.serve(config.prometheus_host, config.prometheus_port, ranks.local_rank, left)
    if endpoint is None:
        return None
    reader = PrometheusMetricReader(resource_attribute_filter=lambda key: key in RANK_RESOURCE_KEYS)
    return reader, endpoint


def build_provider(config: Config, extra_specs: Iterable[MetricSpec] = (),
                   extra_readers: Iterable[MetricReader] = ()) -> ProviderBundle:
    """A MeterProvider with catalog Views and the readers ``config.exporters`` selects.

    ``extra_readers`` (e.g. an InMemoryMetricReader in tests) are attached as well.
    A reader that cannot be built is left out with one warning; the others stay.
    """
    ranks = rank_info()
    readers: list[MetricReader] = list(extra_readers)
    exporters = config.exporters if exports(ranks, config.export_ranks) else ()
    otlp_reader = None
    otlp_exporter = None
    endpoint = None
    inner = _otlp_exporter() if "otlp" in exporters else None
    if inner is not None:
        otlp_exporter = ForkSafeExporter(inner)
        otlp_reader = PeriodicExportingMetricReader(otlp_exporter, export_interval_millis=config.export_interval_ms,
                                                    export_timeout_millis=config.export_timeout_ms)
    if "prometheus" in exporters:
        left = "exporting through OTLP only" if otlp_reader is not None else "this process exports no metrics"
        served = _prometheus_reader(config, ranks, left)
        if served is not None:
            readers.append(served[0])
            endpoint = served[1]
    if otlp_reader is not None:  # after the pull reader: shutdown takes them in order, and the push may take long
        readers.append(otlp_reader)
    resource = build_resource(config, ranks)
    provider = MeterProvider(metric_readers=readers, resource=resource,
                             views=build_views(config, extra_specs), shutdown_on_exit=False,
                             exemplar_filter=exemplar_filter())
    logs = None
    if config.logs_exporters and exports(ranks, config.export_ranks):
        log_limits.attach()  # before the exporters exist: their constructors may already log a header
        try:
            logs = build_logger_provider(config.logs_exporters, resource)
        except BaseException:
            log_limits.detach()
            raise
    return ProviderBundle(provider, otlp_reader, otlp_exporter, endpoint, schema=tuple(extra_specs),
                          logger_provider=logs)
