"""A plain Hugging Face Llama training loop: no otel_llm import, no Trainer.

Random-init ``LlamaForCausalLM`` with tiny sizes (nothing is downloaded), a
manual AdamW loop on random token batches with some left padding. Same
environment contract as ``nanogpt_train.py``:

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
    """Random tokens; every other row is left-padded by a few positions (masked out, labels -100)."""
    input_ids = torch.randint(1, VOCAB, (size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, size, 2):
        pad = int(torch.randint(1, length // 2, (1,), generator=generator))
        input_ids[row, :pad] = PAD
        attention_mask[row, :pad] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def main() -> None:
    steps = int(os.environ.get("TRAIN_STEPS", "40"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
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
