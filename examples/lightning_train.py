"""Train a tiny Llama with Lightning; one callback exports every signal.

    python examples/lightning_train.py              # Prometheus on 127.0.0.1:9464 + OTLP to localhost:4317
    python examples/lightning_train.py --epochs 40 --hold 60

Random-init weights (nothing is downloaded), CPU, a ``LightningModule`` that
wraps a Hugging Face ``LlamaForCausalLM`` and ``accumulate_grad_batches=2``.
``OtelLlmCallback`` instruments the wrapped model and the optimizer; a step is
one optimizer update, as Lightning's ``global_step`` counts. Look at
``llm_train_loss`` (the mean ``training_step`` loss of the step),
``llm_train_steps_total``, ``llm_grad_norm`` (the accumulated gradients before
Lightning's clipping), ``llm_param_update_ratio``, the per-layer
``llm_attention_head_entropy_bucket`` and ``llm_activation_sparsity``. Try PromQL
``llm_param_update_ratio`` or
``histogram_quantile(0.5, sum by (llm_layer, le) (rate(llm_attention_head_entropy_bucket[1m])))``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from otel_llm.integrations.lightning import OtelLlmCallback  # noqa: E402

VOCAB = 128


class TinyLlama(pl.LightningModule):
    def __init__(self, steps: int) -> None:
        super().__init__()
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        self.model = LlamaForCausalLM(config)
        self.steps = steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's loose return type
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (self.steps + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Report(pl.Callback):
    """Prints where to look once training runs; keeps serving for ``hold`` seconds before the session ends."""

    def __init__(self, callback: OtelLlmCallback, hold: float) -> None:
        self.callback, self.hold = callback, hold

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and batch_idx == 0 and self.callback.telemetry is not None:
            url = self.callback.telemetry.prometheus_url
            print(f"otel_llm: scrape {url or '(Prometheus endpoint disabled)'}", flush=True)
            print("otel_llm: try PromQL  llm_param_update_ratio  or  histogram_quantile(0.5, sum by (llm_layer, le) "
                  "(rate(llm_attention_head_entropy_bucket[1m])))", flush=True)

    def on_train_end(self, trainer, pl_module):
        if self.hold > 0:
            print(f"otel_llm: training done; serving for {self.hold:g} s more", flush=True)
            time.sleep(self.hold)


def loader(rows: int = 64, length: int = 32) -> torch.utils.data.DataLoader:
    """Noisy arithmetic sequences, some left-padded (masked out, label -100)."""
    g = torch.Generator().manual_seed(0)
    data = []
    for row in range(rows):
        start, stride = torch.randint(0, VOCAB, (2,), generator=g).tolist()
        ids = (start + stride * torch.arange(length)) % VOCAB
        mask = torch.ones(length, dtype=torch.long)
        mask[: row % 5] = 0
        data.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
                     "labels": ids.masked_fill(mask == 0, -100)})
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep serving after training")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = loader()
    callback = OtelLlmCallback()
    trainer = pl.Trainer(max_epochs=args.epochs, accumulate_grad_batches=2, gradient_clip_val=1.0,
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Report(callback, args.hold), callback])
    trainer.fit(TinyLlama(steps=args.epochs * len(data) // 2), data)
    print(f"trained {trainer.global_step} steps", flush=True)


if __name__ == "__main__":
    main()
