"""Hugging Face Trainer integration: every otel_llm signal from one callback.

    from otel_llm.integrations.transformers import OtelLlmCallback
    Trainer(model=model, args=args, train_dataset=data, callbacks=[OtelLlmCallback()])

or, once this module is imported, ``TrainingArguments(report_to=["otel_llm"])``.
On train begin the callback instruments the Trainer's model and the torch
optimizer inside accelerate's wrapper; the step clock is the optimizer's, so a
step is one optimizer update over all ``gradient_accumulation_steps``
micro-batches, as the Trainer's ``global_step`` counts. ``llm.train.loss`` is
the loss the Trainer logs for the step, and ``llm.train.learning_rate`` the
rate it logs. The session shuts down on train end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from otel_llm.integrations._run import TrainingRun, innermost_optimizer

try:
    from transformers import TrainerCallback
    from transformers.integrations import integration_utils
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("otel_llm.integrations.transformers needs transformers: "
                      "pip install 'otel-llm[hf]'") from exc

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from torch.utils.hooks import RemovableHandle

    from otel_llm.config import Config
    from otel_llm.session import Instrumentation

__all__ = ["REPORT_TO", "OtelLlmCallback"]

REPORT_TO = "otel_llm"
"""The ``report_to`` name this module registers."""


def _output_loss(output: Any) -> torch.Tensor | None:
    """The loss the Trainer reads from a model output: ``output["loss"]``, or ``output[0]`` of a tuple."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        return None
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


class _StepLoss:
    """Rebuilds the step loss the Trainer logs from the model's training outputs.

    The Trainer logs the sum over the step's micro-batches of ``training_step``'s
    value: the model's loss when the model normalised it by ``num_items_in_batch``
    (the tokens of the whole accumulated batch; times the world size when the
    count is global), else the model's loss over the number of micro-batches.
    """

    def __init__(self, world_scale: int) -> None:
        self._world_scale = world_scale
        self._normalised: list[torch.Tensor] = []
        self._means: list[torch.Tensor] = []

    def on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = _output_loss(output)
        if loss is None:
            return
        if kwargs.get("num_items_in_batch") is not None:
            self._normalised.append(loss.detach())
        else:
            self._means.append(loss.detach())

    def take(self) -> torch.Tensor | None:
        """The step's loss (a device tensor), or None when the model returned none; starts the next step."""
        total: torch.Tensor | None = None
        if self._normalised:
            total = torch.stack(self._normalised).float().sum() * self._world_scale
        if self._means:
            mean = torch.stack(self._means).float().mean()
            total = mean if total is None else total + mean.to(total.device)
        self.clear()
        return total

    def clear(self) -> None:
        self._normalised, self._means = [], []


class OtelLlmCallback(TrainerCallback):
    """Exports otel_llm's signals from a Trainer run.

    ``meter_provider`` and ``config`` are passed to :func:`otel_llm.instrument`
    (default: a provider of its own with the readers ``OTEL_METRICS_EXPORTER``
    selects). A session already running (``opentelemetry-instrument``) is used
    and left running.
    """

    def __init__(self, *, meter_provider: MeterProvider | None = None, config: Config | None = None) -> None:
        self._run = TrainingRun(meter_provider, config)
        self._loss = _StepLoss(world_scale=1)
        self._hook: RemovableHandle | None = None
        self._has_optimizer = False

    @property
    def telemetry(self) -> Instrumentation | None:
        """The session of the current run (None outside ``train()``)."""
        return self._run.telemetry

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        self._end()  # a previous train() that raised
        inner = innermost_optimizer(optimizer)
        self._run.start(model, inner)
        self._has_optimizer = inner is not None
        self._loss = _StepLoss(args.world_size if getattr(args, "average_tokens_across_devices", False) else 1)
        if model is not None:
            self._hook = model.register_forward_hook(self._loss.on_forward, with_kwargs=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        telemetry = self._run.telemetry
        if telemetry is not None and not self._has_optimizer:  # created after train begin (older Trainers)
            inner = innermost_optimizer(optimizer)
            if inner is not None:
                telemetry.attach(optimizer=inner)
                self._has_optimizer = True
        self._loss.clear()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        telemetry = self._run.telemetry
        loss = self._loss.take()
        if telemetry is not None and loss is not None:
            telemetry.record_loss(loss)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end()

    def _end(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._run.end()


def _register_report_to() -> None:
    """Make ``report_to="otel_llm"`` name this callback.

    transformers has no public registry for reporting integrations; the Trainer
    looks names up in ``INTEGRATION_TO_CALLBACK`` when it is constructed.
    """
    integration_utils.INTEGRATION_TO_CALLBACK.setdefault(REPORT_TO, OtelLlmCallback)


_register_report_to()
