"""The Hugging Face Trainer and Lightning callbacks honour the guards.

Each framework trains :class:`~tests.support.scripted.Scripted` (the gradient norm
of every step is chosen here) under its otel_llm callback: a NaN loss at one step
is skipped with the parameters unchanged bitwise, and the scripted decay rates
back the learning rate off at the step the rule says, through the framework's
own linear LR schedule (whose base rates the callback hands to the guard).
"""

from __future__ import annotations

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import otel_llm
from otel_llm.catalog import GUARD_ACTIONS, TRAIN_SKIPPED_STEPS
from tests.conftest import Metrics
from tests.support.scripted import Scripted, norms_for

transformers = pytest.importorskip("transformers")
L = pytest.importorskip("lightning.pytorch")
from otel_llm.integrations.lightning import OtelLlmCallback as LightningCallback  # noqa: E402
from otel_llm.integrations.transformers import OtelLlmCallback as TrainerCallback  # noqa: E402

STEPS, LR, POISONED = 14, 0.1, 5
DECAYS = {t: 0.9 for t in range(2, STEPS, 2)}  # sampled steps 2, 4, 6: the backoff at 6 (K = 3)
BACKOFF_AT = 6


def config(guard: str) -> otel_llm.Config:
    return otel_llm.Config(exporters="none", sampling="fixed", sampling_interval=2, guards=guard,
                           guard_lr_backoff_patience=3, guard_lr_backoff_cooldown=100)


class Model(Scripted):
    """Scripted, called by the frameworks: the norm of the n-th training call, NaN at call ``poison``."""

    def __init__(self, norms: list[float], poison: int | None) -> None:
        super().__init__()
        self.norms, self.poison, self.calls = norms, poison, 0

    def forward(self, x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        call, self.calls = self.calls, self.calls + 1
        loss = self.loss(self.norms[min(call, len(self.norms) - 1)])
        return {"loss": loss * float("nan") if call == self.poison else loss}


class Watch:
    """The parameters around each step and the learning rate after it."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self.lrs: list[float] = []


def linear(step: int) -> float:
    """Both frameworks' schedule here: linear decay to 0 over STEPS, no warmup (after ``step`` steps)."""
    return LR * (STEPS - step) / STEPS


def check(watch: Watch, guard: str, metrics: Metrics) -> None:
    if guard == "skip_nonfinite":
        assert torch.equal(watch.before[POISONED], watch.after[POISONED])
        assert all(torch.isfinite(p).all() for p in watch.after)
        assert not torch.equal(watch.after[POISONED + 1], watch.after[POISONED])
        assert metrics.value(TRAIN_SKIPPED_STEPS) == 1
        assert metrics.value(GUARD_ACTIONS, llm_guard_action="skip_nonfinite") == 1
    else:
        for step, lr in enumerate(watch.lrs):
            assert lr == pytest.approx(linear(step + 1) * (0.95 if step >= BACKOFF_AT else 1.0), rel=1e-12), step
        assert metrics.value(GUARD_ACTIONS, llm_guard_action="lr_backoff") == 1


def model_for(guard: str) -> Model:
    norms = norms_for(DECAYS, STEPS) if guard == "lr_backoff" else [1.0] * STEPS
    return Model(norms, POISONED if guard == "skip_nonfinite" else None)


@pytest.mark.parametrize("guard", ["skip_nonfinite", "lr_backoff"])
def test_the_trainer_callback_honours_the_guard(tmp_path, guard):
    model, watch, reader = model_for(guard), Watch(), InMemoryMetricReader()

    class Recorder(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            watch.before.append(model.w.detach().clone())

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            watch.after.append(model.w.detach().clone())
            watch.lrs.append(optimizer.param_groups[0]["lr"])

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=STEPS, learning_rate=LR,
        lr_scheduler_type="linear", optim="sgd", weight_decay=0.0, max_grad_norm=0.0, save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0, report_to="none", logging_strategy="no")
    data = [{"x": torch.zeros(1)} for _ in range(STEPS)]
    callback = TrainerCallback(meter_provider=MeterProvider(metric_readers=[reader]), config=config(guard))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Recorder()])
    trainer.train()
    check(watch, guard, Metrics(reader))


@pytest.mark.parametrize("guard", ["skip_nonfinite", "lr_backoff"])
def test_the_lightning_callback_honours_the_guard(guard):
    watch, reader = Watch(), InMemoryMetricReader()

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model_for(guard)

        def training_step(self, batch, batch_idx):
            return self.model(batch)["loss"]

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=LR)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (STEPS - step) / STEPS)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            watch.before.append(pl_module.model.w.detach().clone())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            watch.after.append(pl_module.model.w.detach().clone())
            watch.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    callback = LightningCallback(meter_provider=MeterProvider(metric_readers=[reader]), config=config(guard))
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, Recorder()])
    trainer.fit(Module(), torch.utils.data.DataLoader([torch.zeros(1)] * STEPS, batch_size=1))
    check(watch, guard, Metrics(reader))
