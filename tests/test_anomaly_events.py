"""Anomaly events as OTel log records: what an OTLP receiver gets, over gRPC and HTTP, and when it gets nothing."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from opentelemetry.sdk.resources import Resource

import otel_llm
from otel_llm.catalog import ANOMALY_EVENTS, TELEMETRY_NONFINITE
from otel_llm.export.events import EVENT_NAME, AnomalyLog, build_logger_provider
from otel_llm.export.log_limits import ExportLogFilter, header_secrets
from otel_llm.export.provider import build_provider
from otel_llm.pipeline.anomaly import Anomaly
from tests.conftest import Harness
from tests.models import GPT
from tests.support.receivers import GrpcMetricsReceiver, HttpMetricsReceiver

RECEIVERS = {"grpc": GrpcMetricsReceiver, "http/protobuf": HttpMetricsReceiver}


def logs_env(monkeypatch: pytest.MonkeyPatch, protocol: str, port: int) -> None:
    """OTEL_LOGS_EXPORTER=otlp with the protocol chosen the SDK's way (the generic variable, not the logs one)."""
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    path = "/v1/logs" if protocol == "http/protobuf" else ""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", f"http://127.0.0.1:{port}{path}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_INSECURE", "true")


@pytest.mark.parametrize("protocol", sorted(RECEIVERS))
def test_one_record_carries_the_signal_its_attributes_step_score_and_threshold(monkeypatch, protocol):
    with RECEIVERS[protocol]() as receiver:
        logs_env(monkeypatch, protocol, receiver.port)
        provider = build_logger_provider(otel_llm.Config().logs_exporters, Resource({"llm.rank": 3}))
        assert provider is not None
        try:
            AnomalyLog(provider).emit(Anomaly("llm.attention.logit_max", {"llm.layer": "2"}, 209, 12.5), 6.5)
            assert provider.force_flush(5000)
            assert receiver.logs.wait_for(1, timeout=5)
        finally:
            provider.shutdown()
        (record,) = receiver.logs.records()
    assert record.attributes == {"llm.signal": "llm.attention.logit_max", "llm.layer": "2", "llm.step": 209,
                                 "llm.anomaly.score": 12.5, "llm.anomaly.threshold": 6.5}
    assert record.event_name == EVENT_NAME == "llm.anomaly"
    assert (record.severity_number, record.severity_text) == (13, "WARN")  # SeverityNumber.WARN in the OTLP enum
    assert record.body == "anomaly in llm.attention.logit_max llm.layer=2 at step 209: score 12.5 > 6.5"
    assert record.resource["llm.rank"] == 3 and record.time_unix_nano > 0


def _poison(model: GPT) -> torch.utils.hooks.RemovableHandle:
    """NaN embeddings: a batch that turns every forward and gradient signal of its step non-finite."""
    return model.transformer.wte.register_forward_hook(lambda _m, _args, output: output * math.nan)


def test_a_session_that_goes_non_finite_sends_one_record_per_counted_event(monkeypatch, sessions):
    with GrpcMetricsReceiver() as receiver:
        logs_env(monkeypatch, "grpc", receiver.port)
        torch.manual_seed(0)
        model = GPT()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        harness = Harness(model, optimizer, sampling_interval=1)
        sessions.append(harness.session)
        for step in range(4):
            handle = _poison(model) if step == 3 else None
            idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
            _, loss = model(idx, idx)
            if handle is not None:
                handle.remove()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        metrics = harness.collect()  # flushes the log records too
        assert receiver.logs.wait_for(1, timeout=5)
        records = receiver.logs.records()
    counted = {dict(p.attributes)["llm.signal"]: p.value for p in metrics.points[ANOMALY_EVENTS]}
    recorded: dict[str, int] = {}
    for record in records:
        recorded[record.attributes["llm.signal"]] = recorded.get(record.attributes["llm.signal"], 0) + 1
    assert recorded == counted  # one record per event, and the counter stays
    nonfinite = {dict(p.attributes)["llm.signal"] for p in metrics.points[TELEMETRY_NONFINITE]}
    assert {"llm.train.loss", "llm.grad.norm", "llm.attention.logit_max"} <= set(recorded) <= nonfinite
    for record in records:
        assert record.attributes["llm.step"] == 3
        assert record.attributes["llm.anomaly.score"] == math.inf
        assert record.attributes["llm.anomaly.threshold"] == 6.5
    logit_max = [r for r in records if r.attributes["llm.signal"] == "llm.attention.logit_max"]
    layers = sorted(r.attributes["llm.layer"] for r in logit_max)
    assert layers == ["0", "1"]  # one per series: each layer's own record


@pytest.mark.parametrize("value", [None, "none", " None "])
def test_no_logger_provider_unless_otel_logs_exporter_names_an_exporter(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("OTEL_LOGS_EXPORTER", raising=False)
    else:
        monkeypatch.setenv("OTEL_LOGS_EXPORTER", value)
    config = otel_llm.Config(exporters="none")
    assert config.logs_exporters == ()
    bundle = build_provider(config)
    try:
        assert bundle.logger_provider is None
    finally:
        bundle.shutdown(1.0)


def test_logs_exporters_are_the_installed_entry_points(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "otlp_proto_http,Console")
    assert otel_llm.Config().logs_exporters == ("otlp_proto_http", "console")
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "zipkin")
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        assert otel_llm.Config().logs_exporters == ()  # a typo in a job spec never stops the run
    assert "OTEL_LOGS_EXPORTER" in caplog.text and "zipkin" in caplog.text
    with pytest.raises(ValueError, match="names no installed logs exporter"):
        otel_llm.Config(logs_exporters="zipkin")


def _filtered_loggers() -> set[str]:
    return {name for name, logger in logging.Logger.manager.loggerDict.items()
            if isinstance(logger, logging.Logger) and any(isinstance(f, ExportLogFilter) for f in logger.filters)}


def test_the_log_exporters_share_the_export_log_filter_until_shutdown(monkeypatch):
    logs_env(monkeypatch, "grpc", 9)  # nothing listens: the records would only ever fail
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_HEADERS", "authorization=Bearer%20s3cret-token")
    assert "Bearer s3cret-token" in header_secrets()  # the logs exporter's headers are redacted too
    bundle = build_provider(otel_llm.Config(exporters="none"))
    try:
        assert bundle.logger_provider is not None
        assert "opentelemetry.exporter.otlp.proto.grpc.exporter" in _filtered_loggers()
    finally:
        assert bundle.shutdown(2.0)
    assert _filtered_loggers() == set()
