"""A plain Hugging Face generation script with prefix reuse: no otel_llm import.

Random-init ``LlamaForCausalLM`` (2 layers, nothing downloaded, no EOS so every
call generates exactly ``NEW_TOKENS``). It prefills a prompt prefix shared by a
batch of 2 into a ``DynamicCache`` once, then runs greedy ``generate()`` twice
on the full prompts with a copy of that cache, so only the suffix and the new
tokens are computed. Prints ``generated`` when done; ``TRAIN_HOLD_FILE`` (when
set) holds the process until that file exists (at most 60 s).
"""

from __future__ import annotations

import copy
import os
import pathlib
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 64
ROWS, PREFIX, SUFFIX, NEW_TOKENS = 2, 10, 3, 5


def hold() -> None:
    path = os.environ.get("TRAIN_HOLD_FILE")
    if not path:
        return
    deadline = time.monotonic() + 60.0
    while not pathlib.Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    prefix = torch.randint(0, VOCAB, (1, PREFIX)).expand(ROWS, PREFIX)
    prompts = torch.cat([prefix, torch.randint(0, VOCAB, (ROWS, SUFFIX))], dim=1)
    with torch.no_grad():
        cache = DynamicCache(config=config)
        model(input_ids=prefix, cache=cache, use_cache=True)
    for _ in range(2):
        out = model.generate(prompts, cache=copy.deepcopy(cache), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False)
        print("tokens", out[:, -NEW_TOKENS:].tolist(), flush=True)
    print("generated", flush=True)
    hold()
    print("done", flush=True)


if __name__ == "__main__":
    main()
