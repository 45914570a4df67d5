"""The Hugging Face Trainer callback exports what the explicit API exports on the same training.

Run A trains a tiny PEFT LoRA Llama with the Trainer (2 epochs, gradient
accumulation 2, an odd number of micro-batches per epoch so every epoch ends
with a one-micro-batch step) and ``report_to="otel_llm"``; after every optimizer
step the test scrapes the callback's Prometheus endpoint and records the
micro-batches the model was called with. Run B rebuilds the same model (same
seed) and the Trainer's own optimizer and schedule, replays those micro-batches
in a plain loop instrumented with ``otel_llm.instrument(model, optimizer)``
and ``record_loss`` of the loss the Trainer computes, and scrapes after every
step. Every deterministic series must be equal, step by step.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import otel_llm
from otel_llm.session import active
from tests.conftest import Metrics
from tests.support.backends import free_port
from tests.support.scrape import deterministic, mismatches, scrape, value

transformers = pytest.importorskip("transformers")
from otel_llm.integrations.transformers import OtelLlmCallback  # noqa: E402
from tests.models import padded_rows, tiny_lora_llama  # noqa: E402

VOCAB = 64
ROWS = 10  # 5 micro-batches of 2 per epoch: steps of 2, 2 and 1 micro-batches
EPOCHS = 2
STEPS = 6


def lora_llama() -> torch.nn.Module:
    return tiny_lora_llama(VOCAB)


def dataset() -> list[dict[str, torch.Tensor]]:
    return padded_rows(ROWS, VOCAB)


def training_args(tmp_path, **overrides) -> transformers.TrainingArguments:
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   num_train_epochs=EPOCHS, learning_rate=1e-2, logging_steps=1, save_strategy="no", use_cpu=True,
                   dataloader_num_workers=0, disable_tqdm=True, seed=0, report_to="none")
    return transformers.TrainingArguments(**{**options, **overrides})


class Recorder(transformers.TrainerCallback):
    """The model's training calls of each optimizer step, and a scrape after each step."""

    def __init__(self) -> None:
        self.steps: list[list[dict]] = []
        self.scrapes: list[dict] = []
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def record(module, call_args, call_kwargs):
            if module.training and torch.is_grad_enabled():
                self.steps[-1].append({k: v.clone() if isinstance(v, torch.Tensor) else v
                                       for k, v in call_kwargs.items()})

        self._handle = model.register_forward_pre_hook(record, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append([])

    def on_step_end(self, args, state, control, **kwargs):
        telemetry = active()
        assert telemetry.flush(5.0)
        self.scrapes.append(scrape(telemetry.prometheus_url))

    def on_train_end(self, args, state, control, **kwargs):
        self._handle.remove()


def explicit_run(tmp_path, steps: list[list[dict]], port: int) -> list[dict]:
    """The same training as a plain loop under ``otel_llm.instrument``; a scrape after each step."""
    model = lora_llama()
    model.train()
    args = training_args(tmp_path / "explicit")
    builder = transformers.Trainer(model=model, args=args, train_dataset=dataset())
    builder.create_optimizer_and_scheduler(num_training_steps=STEPS)
    optimizer, schedule = builder.optimizer, builder.lr_scheduler
    scrapes = []
    config = otel_llm.Config(prometheus_port=port)
    with otel_llm.instrument(model, optimizer, config=config) as telemetry:
        for micro_batches in steps:
            trainer_loss = torch.zeros(())
            for inputs in micro_batches:
                loss = model(**inputs).loss  # normalised by num_items_in_batch: the whole step's label tokens
                loss.backward()
                trainer_loss += loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            telemetry.record_loss(trainer_loss)
            optimizer.step()
            schedule.step()
            model.zero_grad()
            assert telemetry.flush(5.0)
            scrapes.append(scrape(telemetry.prometheus_url))
    return scrapes


@pytest.fixture
def exporting(monkeypatch):
    """Prometheus only, every step sampled, on a free port; returns the port."""
    port = free_port()
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    monkeypatch.setenv("OTEL_LLM_SAMPLING_INTERVAL", "1")
    return port


def test_trainer_callback_exports_what_the_explicit_api_exports(tmp_path, exporting):
    recorder = Recorder()
    data = dataset()
    trainer = transformers.Trainer(model=lora_llama(), args=training_args(tmp_path, report_to=["otel_llm"]),
                                   train_dataset=data, callbacks=[recorder])
    assert any(isinstance(c, OtelLlmCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert active() is None  # shut down on train end

    assert trainer.state.global_step == STEPS
    assert [len(micro_batches) for micro_batches in recorder.steps] == [2, 2, 1] * EPOCHS
    expected = explicit_run(tmp_path, recorder.steps, free_port())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    tokens = 0
    for step, (callback, explicit) in enumerate(zip(recorder.scrapes, expected, strict=True)):
        assert mismatches(deterministic(callback), deterministic(explicit)) == [], f"step {step}"
        # gradient accumulation: one step per optimizer update, tokens of all its micro-batches
        tokens += sum(int(inputs["attention_mask"].sum()) for inputs in recorder.steps[step])
        assert value(callback, "llm_train_steps_total") == step + 1
        assert value(callback, "llm_train_tokens_total") == tokens
        # the loss and learning rate the Trainer logs for the step
        assert value(callback, "llm_train_loss") == pytest.approx(logged[step]["loss"], rel=1e-6)
        rates = [value(callback, "llm_train_learning_rate", llm_param_group=g) for g in ("0", "1")]
        assert rates == pytest.approx([logged[step]["learning_rate"]] * 2, rel=1e-9)  # decay and no-decay groups
        assert value(callback, "llm_grad_norm") == pytest.approx(logged[step]["grad_norm"], rel=1e-6)
    names = {name for name, _ in expected[-1]}
    assert {"llm_grad_norm", "llm_param_update_ratio", "llm_lora_rank_activation_ratio", "llm_loss_token_bucket",
            "llm_attention_head_entropy_bucket", "llm_activation_sparsity"} <= names


def test_grad_norm_is_the_trainers_pre_clip_grad_norm_and_clipped_steps_are_counted(tmp_path, exporting):
    """A bound the norms cross: the exported norm is the one the Trainer logs (before clipping), not the bound."""
    recorder = Recorder()
    bound = 0.17
    trainer = transformers.Trainer(model=lora_llama(), train_dataset=dataset(), callbacks=[recorder],
                                   args=training_args(tmp_path, report_to=["otel_llm"], max_grad_norm=bound))
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(logged) == len(recorder.scrapes) == STEPS
    assert 0 < sum(norm > bound for norm in logged) < STEPS, "no step on one side of the bound: proves nothing"
    for step, scraped in enumerate(recorder.scrapes):
        assert value(scraped, "llm_grad_norm") == pytest.approx(logged[step], rel=1e-6), f"step {step}"
        clipped = sum(norm > bound for norm in logged[:step + 1])
        counted = sum(v for (name, _), v in scraped.items() if name == "llm_grad_clipped_steps_total")  # absent: 0
        assert counted == clipped, f"step {step}"


def test_logged_loss_is_the_token_mean_of_the_accumulated_batch(tmp_path, exporting):
    """With unequal micro-batches the Trainer's loss is not the mean of the micro-batch means,
    which is what intercepting cross_entropy alone would report."""
    recorder = Recorder()
    trainer = transformers.Trainer(model=lora_llama(), args=training_args(tmp_path, num_train_epochs=1),
                                   train_dataset=dataset(), callbacks=[OtelLlmCallback(), recorder])
    captured: list[list[float]] = []

    def per_call(module, args, kwargs, output):
        if module.training and torch.is_grad_enabled():
            captured[-1].append(float(output.loss.detach()) * float(kwargs["num_items_in_batch"]) /
                                float((kwargs["labels"][:, 1:] != -100).sum()))

    handle = trainer.model.register_forward_hook(per_call, with_kwargs=True)
    trainer.add_callback(type("StepMark", (transformers.TrainerCallback,),
                              {"on_step_begin": lambda self, *a, **k: captured.append([])})())
    try:
        trainer.train()
    finally:
        handle.remove()
    losses = [value(s, "llm_train_loss") for s in recorder.scrapes]
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses == pytest.approx(logged, rel=1e-6)
    micro_means = [sum(calls) / len(calls) for calls in captured]
    assert max(abs(a - b) for a, b in zip(losses, micro_means)) > 1e-3


def test_a_running_session_is_used_and_left_running(tmp_path, harness):
    h = harness(sampling_interval=1)
    callback = OtelLlmCallback()
    trainer = transformers.Trainer(model=lora_llama(), args=training_args(tmp_path, num_train_epochs=1),
                                   train_dataset=dataset(), callbacks=[callback])
    trainer.train()
    assert callback.telemetry is None and not h.session.closed
    m = h.collect()
    assert m.value("llm.train.steps") == trainer.state.global_step == 3
    assert m.value("llm.train.loss") == pytest.approx(trainer.state.log_history[2]["loss"], rel=1e-6)


def test_an_optimizer_that_appears_after_train_begin_is_followed():
    """Older Trainers (and delayed creation) pass no optimizer to on_train_begin: the callback attaches the one
    inside the wrapper at the first step, so another optimizer stepping first is not taken for it."""
    reader = InMemoryMetricReader()
    callback = OtelLlmCallback(meter_provider=MeterProvider(metric_readers=[reader]),
                               config=otel_llm.Config(exporters="none", sampling_interval=1))
    args = SimpleNamespace(world_size=1, average_tokens_across_devices=True)
    model = lora_llama()
    callback.on_train_begin(args, None, None, model=model, optimizer=None)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    other = torch.nn.Linear(2, 2)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    callback.on_step_begin(args, None, None, optimizer=SimpleNamespace(optimizer=optimizer))  # a wrapper
    other(torch.ones(1, 2)).sum().backward()
    other_optimizer.step()
    batch = dataset()[0]
    loss = model(**{k: v[None] for k, v in batch.items()}).loss
    loss.backward()
    optimizer.step()
    assert callback.telemetry.flush(5.0)
    m = Metrics(reader)
    assert m.value("llm.train.steps") == 1
    assert m.value("llm.train.loss") == pytest.approx(float(loss.detach()), rel=1e-6)
    assert m.value("llm.train.tokens") == int(batch["attention_mask"].sum())
    callback.on_train_end(args, None, None)
    assert callback.telemetry is None and not model._forward_hooks
