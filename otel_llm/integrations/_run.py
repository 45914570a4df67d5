"""What the framework callbacks share: one session per training run, and the optimizer the hooks see."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from otel_llm import instrument
from otel_llm.session import Instrumentation, active

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from otel_llm.config import Config

__all__ = ["TrainingRun"]


class TrainingRun:
    """The session of one framework training run, started at train begin and ended at train end.

    A session that was already running (``opentelemetry-instrument``, or an explicit
    ``otel_llm.instrument()``) is reused and left running for whoever started it.
    """

    def __init__(self, meter_provider: MeterProvider | None, config: Config | None) -> None:
        self._meter_provider = meter_provider
        self._config = config
        self._owned = False
        self.telemetry: Instrumentation | None = None

    def start(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> Instrumentation:
        self.end()
        owned = active() is None
        self.telemetry = instrument(model, optimizer, meter_provider=self._meter_provider, config=self._config)
        self._owned = owned
        return self.telemetry

    def end(self) -> None:
        if self.telemetry is not None and self._owned:
            self.telemetry.shutdown()
        self.telemetry, self._owned = None, False
