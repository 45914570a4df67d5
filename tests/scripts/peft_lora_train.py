"""A plain PEFT LoRA fine-tuning loop: no otel_llm import, no Trainer.

Random-init ``LlamaForCausalLM`` with tiny sizes (nothing is downloaded)
wrapped by ``peft.get_peft_model`` (rank 4 on q/v/down projections, dropout
0.05), a manual AdamW loop over the adapter parameters on random, partly
left-padded batches. Environment:

* ``TRAIN_STEPS`` (default 40): optimizer steps to take;
* ``TRAIN_HOLD_FILE``: when set, after training wait (at most 60 s) until this
  file exists before exiting, so a test can scrape the live process.
"""

from __future__ import annotations

import os
import pathlib
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 64
PAD = 0


def hold() -> None:
    """Wait (at most 60 s) for TRAIN_HOLD_FILE to exist, when it is set."""
    path = os.environ.get("TRAIN_HOLD_FILE")
    if not path:
        return
    deadline = time.monotonic() + 60.0
    while not pathlib.Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def batch(generator: torch.Generator, size: int = 4, length: int = 16) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(1, VOCAB, (size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def main() -> None:
    steps = int(os.environ.get("TRAIN_STEPS", "40"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(1234)
    for step in range(steps):
        out = model(**batch(generator))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            print(f"step {step} loss {out.loss.item():.4f}", flush=True)
    print(f"trained {steps} steps", flush=True)
    hold()
    print("done", flush=True)


if __name__ == "__main__":
    main()
