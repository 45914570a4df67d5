"""Hugging Face Trainer integration: every otel_llm signal from one callback.

    from otel_llm.integrations.transformers import OtelLlmCallback
    Trainer(model=model, args=args, train_dataset=data, callbacks=[OtelLlmCallback()])

or, once this module is imported, ``TrainingArguments(report_to=["otel_llm"])``.
On train begin the callback instruments the Trainer's model and the torch
optimizer inside accelerate's wrapper; the step clock is the optimizer's, so a
step is one optimizer update over all ``gradient_accumulation_steps``
micro-batches, as the Trainer's ``global_step`` counts. ``llm.train.loss`` is
the loss the Trainer logs for the step (the sum of its ``training_step`` values,
seen by the session's loss probe, also under zero code and for TRL's trainers),
and ``llm.train.learning_rate`` the rate it logs. The Trainer's LR scheduler is
handed to the guards, so ``lr_backoff`` scales its base rates. The session
shuts down on train end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from otel_llm.integrations._run import TrainingRun
from otel_llm.probes._wrappers import innermost_optimizer

try:
    from transformers import TrainerCallback
    from transformers.integrations import integration_utils
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("otel_llm.integrations.transformers needs transformers: "
                      "pip install 'otel-llm[hf]'") from exc

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from otel_llm.config import Config
    from otel_llm.session import Instrumentation

__all__ = ["REPORT_TO", "OtelLlmCallback"]

REPORT_TO = "otel_llm"
"""The ``report_to`` name this module registers."""


class OtelLlmCallback(TrainerCallback):
    """Exports otel_llm's signals from a Trainer run.

    ``meter_provider`` and ``config`` are passed to :func:`otel_llm.instrument`
    (default: a provider of its own with the readers ``OTEL_METRICS_EXPORTER``
    selects). A session already running (``opentelemetry-instrument``) is used
    and left running.
    """

    def __init__(self, *, meter_provider: MeterProvider | None = None, config: Config | None = None) -> None:
        self._run = TrainingRun(meter_provider, config)
        self._has_optimizer = False

    @property
    def telemetry(self) -> Instrumentation | None:
        """The session of the current run (None outside ``train()``)."""
        return self._run.telemetry

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        self._end()  # a previous train() that raised
        inner = innermost_optimizer(optimizer)
        telemetry = self._run.start(model, inner)
        self._has_optimizer = inner is not None
        telemetry.follow_scheduler(_scheduler(lr_scheduler))

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None,
                      **kwargs: Any) -> None:
        telemetry = self._run.telemetry
        if telemetry is not None and not self._has_optimizer:  # created after train begin (older Trainers)
            inner = innermost_optimizer(optimizer)
            if inner is not None:
                telemetry.attach(optimizer=inner)
                telemetry.follow_scheduler(_scheduler(lr_scheduler))
                self._has_optimizer = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end()

    def _end(self) -> None:
        self._run.end()


def _scheduler(lr_scheduler: Any) -> Any:
    """The torch scheduler inside accelerate's wrapper (its ``scheduler``), or the one given."""
    return getattr(lr_scheduler, "scheduler", lr_scheduler)


def _register_report_to() -> None:
    """Make ``report_to="otel_llm"`` name this callback.

    transformers has no public registry for reporting integrations; the Trainer
    looks names up in ``INTEGRATION_TO_CALLBACK`` when it is constructed.
    """
    integration_utils.INTEGRATION_TO_CALLBACK.setdefault(REPORT_TO, OtelLlmCallback)


_register_report_to()
