"""TRL's SFTTrainer (tiny local Llama, PEFT LoRA, accumulation 2), with and without gradient checkpointing.

TRL computes the loss in a fused LM head that never calls ``F.cross_entropy``
and, by default, checkpoints activations. Both ways a user runs it are checked:
our Trainer callback, and a session that finds the model itself (what
``opentelemetry-instrument`` starts). After every optimizer step a callback of
the test reads the session. The loss and token counts must equal what
SFTTrainer itself logs; the per-layer families, their layer labels and values
must equal those of the same run without checkpointing.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import Metrics, rel_close
from tests.models import tiny_llama
from tests.support.scrape import scrape, value

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
from otel_llm.integrations.transformers import OtelLlmCallback  # noqa: E402
from otel_llm.session import active  # noqa: E402

VOCAB = 64
STEPS = 3
LAYERS = ("0", "1")
LAYER_SIGNALS = ("llm.attention.logit_max", "llm.attention.sink_ratio", "llm.activation.sparsity",
                 "llm.activation.outlier_ratio", "llm.lora.rank_activation_ratio")


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0``…``w63``, built here: nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="w0", bos_token="w1",
                                                eos_token="w2", unk_token="w3")


def rows() -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, 14, (4 * STEPS,), generator=g).tolist()  # unequal: padding in every batch
    return datasets.Dataset.from_list([{"input_ids": torch.randint(4, VOCAB, (n,), generator=g).tolist()}
                                       for n in lengths])


class StepReader(transformers.TrainerCallback):
    """What the session exports after each optimizer step: a scrape, or the harness's reader."""

    def __init__(self, read) -> None:
        self.read = read
        self.steps: list = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(self.read())


def sft(tmp_path, checkpointing: bool, callbacks: list) -> trl.SFTTrainer:
    torch.manual_seed(0)
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=STEPS, learning_rate=1e-2, logging_steps=1, save_strategy="no", use_cpu=True,
                         report_to="none", gradient_checkpointing=checkpointing, disable_tqdm=True,
                         dataloader_num_workers=0, seed=0)
    trainer = trl.SFTTrainer(model=tiny_llama(VOCAB), args=args, train_dataset=rows(),
                             processing_class=word_tokenizer(), callbacks=callbacks,
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    assert trainer.args.gradient_checkpointing is checkpointing
    trainer.train()
    return trainer


def logged(trainer: trl.SFTTrainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def check_runs(runs: dict[bool, tuple[trl.SFTTrainer, list]], read_value) -> None:
    """Per run, loss and tokens (cumulative, as both count them) equal SFTTrainer's logs at every step;
    every per-layer signal of the checkpointed run equals the plain run's, step by step."""
    for trainer, steps in runs.values():
        losses, tokens = logged(trainer, "loss"), logged(trainer, "num_tokens")
        assert len(steps) == len(losses) == STEPS
        for step, exported in enumerate(steps):
            assert rel_close(read_value(exported, "llm.train.loss", None), losses[step], rel=1e-6), step
            assert read_value(exported, "llm.train.tokens", None) == tokens[step], step
    for plain_step, checkpointed_step in zip(runs[False][1], runs[True][1]):
        for name in LAYER_SIGNALS:
            plain = {layer: read_value(plain_step, name, layer) for layer in LAYERS}
            checkpointed = {layer: read_value(checkpointed_step, name, layer) for layer in LAYERS}
            assert checkpointed == pytest.approx(plain, rel=1e-5), name


def scraped_value(scraped: dict, name: str, layer: str | None) -> float:
    series = name.replace(".", "_") + ("_total" if name == "llm.train.tokens" else "")
    return value(scraped, series, **({} if layer is None else {"llm_layer": layer}))


def metric_value(m: Metrics, name: str, layer: str | None) -> float:
    return m.value(name) if layer is None else m.value(name, llm_layer=layer)


@pytest.fixture
def exporting(monkeypatch):
    from tests.support.backends import free_port

    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(free_port()))
    monkeypatch.setenv("OTEL_LLM_SAMPLING_INTERVAL", "1")


def callback_run(tmp_path, checkpointing: bool) -> tuple[trl.SFTTrainer, list]:
    def read():
        telemetry = active()
        assert telemetry.flush(5.0)
        return scrape(telemetry.prometheus_url)

    reader = StepReader(read)
    trainer = sft(tmp_path / f"callback-{checkpointing}", checkpointing, [OtelLlmCallback(), reader])
    return trainer, reader.steps


def discovered_run(tmp_path, harness, checkpointing: bool) -> tuple[trl.SFTTrainer, list]:
    h = harness(sampling_interval=1)
    reader = StepReader(h.collect)
    trainer = sft(tmp_path / f"discovered-{checkpointing}", checkpointing, [reader])
    h.session.shutdown()
    return trainer, reader.steps


@pytest.mark.slow
def test_callback_with_and_without_gradient_checkpointing(tmp_path, exporting):
    runs = {checkpointing: callback_run(tmp_path, checkpointing) for checkpointing in (False, True)}
    check_runs(runs, scraped_value)


@pytest.mark.slow
def test_discovered_model_with_and_without_gradient_checkpointing(tmp_path, harness, caplog):
    with caplog.at_level(logging.INFO, logger="otel_llm"):
        runs = {checkpointing: discovered_run(tmp_path, harness, checkpointing) for checkpointing in (False, True)}
    check_runs(runs, metric_value)
    for step in runs[True][1]:
        assert "llm.loss.token" not in step.names()  # the fused head never builds the logits
    assert sum("not computed through torch.nn.functional.cross_entropy" in r.getMessage()
               for r in caplog.records) == len(runs)  # once per session
