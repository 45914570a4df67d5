"""Fine-tune a tiny LoRA Llama with the Hugging Face Trainer; one callback exports every signal.

    python examples/hf_trainer_lora.py              # Prometheus on 127.0.0.1:9464 + OTLP to localhost:4317
    python examples/hf_trainer_lora.py --epochs 40 --hold 60

Random-init weights (nothing is downloaded), CPU, PEFT LoRA rank 4 on the
attention and MLP projections. ``OtelLlmCallback`` (equivalently
``report_to="otel_llm"``) instruments the Trainer's model and optimizer; a step
is one optimizer update over ``gradient_accumulation_steps=2`` micro-batches.
Look at ``llm_train_loss`` (the loss the Trainer logs), ``llm_train_learning_rate``,
``llm_train_tokens_total``, ``llm_grad_norm`` and the adapters' own series:
``llm_lora_rank_activation_ratio`` per layer and ``llm_grad_sparsity`` of the
``lora_a`` and ``lora_b`` groups. Try PromQL
``max by (llm_layer) (llm_lora_rank_activation_ratio)`` or
``llm_grad_sparsity{llm_param_group="lora_b"}``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from otel_llm.integrations.transformers import OtelLlmCallback  # noqa: E402

VOCAB = 128


class Report(TrainerCallback):
    """Prints where to look once training runs; keeps serving for ``hold`` seconds before the session ends."""

    def __init__(self, callback: OtelLlmCallback, hold: float) -> None:
        self.callback, self.hold = callback, hold

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and self.callback.telemetry is not None:
            url = self.callback.telemetry.prometheus_url
            print(f"otel_llm: scrape {url or '(Prometheus endpoint disabled)'}", flush=True)
            print("otel_llm: try PromQL  max by (llm_layer) (llm_lora_rank_activation_ratio)  or  "
                  'llm_grad_sparsity{llm_param_group="lora_b"}', flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.hold > 0:
            print(f"otel_llm: training done; serving for {self.hold:g} s more", flush=True)
            time.sleep(self.hold)


def dataset(rows: int = 64, length: int = 32) -> list[dict[str, torch.Tensor]]:
    """Noisy arithmetic sequences, some left-padded (masked out, label -100)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for row in range(rows):
        start, stride = torch.randint(0, VOCAB, (2,), generator=g).tolist()
        ids = (start + stride * torch.arange(length)) % VOCAB
        mask = torch.ones(length, dtype=torch.long)
        mask[: row % 5] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep serving after training")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    callback = OtelLlmCallback()
    with tempfile.TemporaryDirectory(prefix="hf_trainer_lora_") as output_dir:  # nothing is saved
        training = TrainingArguments(
            output_dir=output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, learning_rate=5e-3, logging_steps=4, save_strategy="no",
            report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=training, train_dataset=dataset(),
                          callbacks=[Report(callback, args.hold), callback])
        trainer.train()
    print(f"trained {trainer.state.global_step} steps", flush=True)


if __name__ == "__main__":
    main()
