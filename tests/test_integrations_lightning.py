"""The Lightning callback exports what the explicit API exports on the same training.

Run A fits a LightningModule around a tiny PEFT LoRA Llama (2 epochs,
``accumulate_grad_batches=2``, 5 micro-batches per epoch so every epoch ends with
a one-micro-batch step) with the callback, scraping its Prometheus endpoint after
every optimizer step. Lightning runs the last micro-batch of a step inside
``optimizer.step(closure)``, after the optimizer's pre-step hook, so without the
callback reading gradients in ``on_before_optimizer_step`` the gradient signals
would describe a partial accumulation. Run B rebuilds the same model (same seed)
and replays the same micro-batches in a plain loop under
``otel_llm.instrument(model, optimizer)``. Every deterministic series must be
equal, step by step.
"""

from __future__ import annotations

import pytest
import torch

import otel_llm
from otel_llm.session import active
from tests.support.backends import free_port
from tests.support.scrape import deterministic, mismatches, scrape, value

L = pytest.importorskip("lightning.pytorch")
from otel_llm.integrations.lightning import OtelLlmCallback  # noqa: E402
from tests.models import padded_rows, tiny_lora_llama  # noqa: E402

VOCAB = 64
ROWS = 10
EPOCHS = 2
ACCUMULATE = 2
STEPS = 6
LR = 1e-2


def lora_llama() -> torch.nn.Module:
    return tiny_lora_llama(VOCAB)


def dataset() -> list[dict[str, torch.Tensor]]:
    return padded_rows(ROWS, VOCAB)


def optimizer_and_schedule(model: torch.nn.Module):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / STEPS)


class LitLlama(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = lora_llama()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        optimizer, schedule = optimizer_and_schedule(self)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Recorder(L.Callback):
    """The micro-batches of each optimizer step, and a scrape after each step."""

    def __init__(self) -> None:
        self.steps: list[list[dict]] = []
        self.scrapes: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if len(self.steps) == trainer.global_step:
            self.steps.append([])
        self.steps[trainer.global_step].append({k: v.clone() for k, v in batch.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if len(self.scrapes) < trainer.global_step:
            telemetry = active()
            assert telemetry.flush(5.0)
            self.scrapes.append(scrape(telemetry.prometheus_url))


def fit(callbacks: list) -> L.Trainer:
    trainer = L.Trainer(max_epochs=EPOCHS, accumulate_grad_batches=ACCUMULATE, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=2)
    trainer.fit(LitLlama(), loader)
    return trainer


def explicit_run(steps: list[list[dict]], port: int) -> list[dict]:
    """The same training as a plain loop under ``otel_llm.instrument``; a scrape after each step."""
    model = lora_llama()
    model.train()
    optimizer, schedule = optimizer_and_schedule(model)
    scrapes = []
    with otel_llm.instrument(model, optimizer, config=otel_llm.Config(prometheus_port=port)) as telemetry:
        for micro_batches in steps:
            for batch in micro_batches:
                (model(**batch).loss / ACCUMULATE).backward()  # Lightning divides even a shorter last step
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            assert telemetry.flush(5.0)
            scrapes.append(scrape(telemetry.prometheus_url))
    return scrapes


@pytest.fixture
def exporting(monkeypatch):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(free_port()))
    monkeypatch.setenv("OTEL_LLM_SAMPLING_INTERVAL", "1")


def test_lightning_callback_exports_what_the_explicit_api_exports(exporting):
    recorder = Recorder()
    callback = OtelLlmCallback()
    trainer = fit([callback, recorder])
    assert callback.telemetry is None and active() is None  # shut down on train end

    assert trainer.global_step == STEPS
    assert [len(micro_batches) for micro_batches in recorder.steps] == [2, 2, 1] * EPOCHS
    expected = explicit_run(recorder.steps, free_port())
    tokens = 0
    for step, (callback_samples, explicit) in enumerate(zip(recorder.scrapes, expected, strict=True)):
        assert mismatches(deterministic(callback_samples), deterministic(explicit)) == [], f"step {step}"
        tokens += sum(int(batch["attention_mask"].sum()) for batch in recorder.steps[step])
        assert value(callback_samples, "llm_train_steps_total") == step + 1
        assert value(callback_samples, "llm_train_tokens_total") == tokens
        assert value(callback_samples, "llm_train_learning_rate", llm_param_group="0") == pytest.approx(
            LR * (1 - step / STEPS), rel=1e-9)
    names = {name for name, _ in expected[-1]}
    assert {"llm_train_loss", "llm_grad_norm", "llm_grad_norm_decay_rate", "llm_param_update_ratio",
            "llm_lora_rank_activation_ratio", "llm_loss_token_bucket", "llm_attention_head_entropy_bucket"} <= names


def test_train_loss_is_the_mean_training_step_loss_of_the_step(harness):
    """A loss cross_entropy never sees (here: twice the model's) is still the step's llm.train.loss."""

    class Doubled(LitLlama):
        def training_step(self, batch, batch_idx):
            loss = 2 * self.model(**batch).loss
            self.step_losses.setdefault(self.trainer.global_step, []).append(float(loss.detach()))
            return loss

    h = harness(sampling_interval=1)
    module = Doubled()
    module.step_losses = {}
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=ACCUMULATE, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[OtelLlmCallback()])
    trainer.fit(module, torch.utils.data.DataLoader(dataset(), batch_size=2))
    assert not h.session.closed  # the running session is used and left running
    m = h.collect()
    assert m.value("llm.train.steps") == 2
    last = module.step_losses[1]
    assert len(last) == ACCUMULATE
    assert m.value("llm.train.loss") == pytest.approx(sum(last) / len(last), rel=1e-6)


def test_missing_lightning_names_the_extra(monkeypatch):
    import builtins
    import importlib
    import sys

    real_import = builtins.__import__

    def without_lightning(name, *args, **kwargs):
        if name == "lightning.pytorch" or name.startswith("lightning"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "otel_llm.integrations.lightning")
    monkeypatch.setattr(builtins, "__import__", without_lightning)
    with pytest.raises(ImportError, match=r"pip install 'otel-llm\[lightning\]'"):
        importlib.import_module("otel_llm.integrations.lightning")
