"""Shared fixtures: a session reading into an InMemoryMetricReader, and metric lookups."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import otel_llm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class Metrics:
    """Collected points by metric name: ``value(name, **attrs)`` and ``histogram(name)``."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.points: dict[str, list[Any]] = {}
        data = reader.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    self.points.setdefault(metric.name, []).extend(metric.data.data_points)

    def names(self) -> set[str]:
        return set(self.points)

    def value(self, name: str, **attributes: str) -> float:
        wanted = {k.replace("_", "."): v for k, v in attributes.items()}
        matches = [p.value for p in self.points.get(name, []) if dict(p.attributes) == wanted]
        assert len(matches) == 1, f"{name}{wanted}: {len(matches)} points in {self.points.get(name)}"
        return matches[0]

    def histogram(self, name: str) -> Any:
        (point,) = self.points[name]
        return point


class Harness:
    """An otel_llm session with an in-memory reader and no network exporters."""

    def __init__(self, model=None, optimizer=None, **config: Any) -> None:
        config.setdefault("exporters", "none")
        config.setdefault("sampling", "fixed")
        self.reader = InMemoryMetricReader()
        self.session = otel_llm.Instrumentation(model, optimizer, config=otel_llm.Config(**config),
                                                extra_readers=[self.reader])

    def collect(self) -> Metrics:
        assert self.session.flush(5.0)
        return Metrics(self.reader)


@pytest.fixture
def sessions() -> Iterator[list[otel_llm.Instrumentation]]:
    """Sessions a test starts; every one is shut down even when the test fails."""
    started: list[otel_llm.Instrumentation] = []
    yield started
    for session in started:
        session.shutdown()


@pytest.fixture
def harness() -> Iterator[type[Harness]]:
    made: list[Harness] = []

    def make(*args: Any, **kwargs: Any) -> Harness:
        h = Harness(*args, **kwargs)
        made.append(h)
        return h

    yield make  # type: ignore[misc]
    for h in made:
        h.session.shutdown()


def rel_close(actual: float, expected: float, rel: float = 1e-4, abs_tol: float = 1e-7) -> bool:
    return abs(actual - expected) <= max(rel * abs(expected), abs_tol)
