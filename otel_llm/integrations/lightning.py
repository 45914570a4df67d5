"""Lightning integration: every otel_llm signal from one ``lightning.pytorch`` callback.

    from otel_llm.integrations.lightning import OtelLlmCallback
    Trainer(callbacks=[OtelLlmCallback()]).fit(module, loader)

On train start the callback instruments the model and the optimizer; a step is
one optimizer update over all ``accumulate_grad_batches`` micro-batches, as
Lightning's ``global_step`` counts. Lightning runs the last micro-batch's forward
and backward inside ``optimizer.step(closure)``, after the optimizer's pre-step
hook, so the gradient signals are read in ``on_before_optimizer_step`` instead:
the accumulated gradients before Lightning's gradient clipping.
``llm.train.loss`` is the mean of the losses ``training_step`` returned over the
step's micro-batches. The guards see the gradients there too, and
``lr_backoff`` scales the base rates of the module's LR schedulers. The session
shuts down on train end (or on an exception).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from otel_llm.integrations._run import TrainingRun
from otel_llm.probes._wrappers import innermost_optimizer

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("otel_llm.integrations.lightning needs Lightning: pip install 'otel-llm[lightning]'") from exc

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from opentelemetry.metrics import MeterProvider

    from otel_llm.config import Config
    from otel_llm.session import Instrumentation

__all__ = ["OtelLlmCallback"]


def _trained_model(module: torch.nn.Module) -> torch.nn.Module:
    """The LightningModule's child holding all its trainable parameters (``self.model = ...``), else the module.

    Token counting hooks this model's forward; ``training_step`` usually calls the
    wrapped model rather than the LightningModule itself.
    """
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    for child in module.children():
        if trainable and trainable <= {id(p) for p in child.parameters()}:
            return child
    return module


class OtelLlmCallback(Callback):
    """Exports otel_llm's signals from a Lightning run.

    ``meter_provider`` and ``config`` are passed to :func:`otel_llm.instrument`
    (default: a provider of its own with the readers ``OTEL_METRICS_EXPORTER``
    selects). A session already running (``opentelemetry-instrument``) is used
    and left running.
    """

    def __init__(self, *, meter_provider: MeterProvider | None = None, config: Config | None = None) -> None:
        self._run = TrainingRun(meter_provider, config)
        self._losses: list[torch.Tensor] = []

    @property
    def telemetry(self) -> Instrumentation | None:
        """The session of the current run (None outside ``fit()``)."""
        return self._run.telemetry

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [innermost_optimizer(o) for o in trainer.optimizers]
        # with several optimizers the session follows the first one that steps
        telemetry = self._run.start(_trained_model(pl_module), optimizers[0] if len(optimizers) == 1 else None)
        for scheduler_config in trainer.lr_scheduler_configs:  # lr_backoff scales their base rates
            telemetry.follow_scheduler(scheduler_config.scheduler)
        self._losses = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # automatic optimization passes training_step's loss divided by accumulate_grad_batches
        self._losses.append(loss.detach() * trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        telemetry = self._run.telemetry
        if telemetry is None:
            return
        if self._losses:
            telemetry.record_loss(torch.stack(self._losses).float().mean())
            self._losses = []
        inner = innermost_optimizer(optimizer)
        if inner is not None:
            telemetry.read_gradients(inner)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run.end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._run.end()
