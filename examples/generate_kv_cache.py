"""Generation with a shared-prefix KV cache; otel_llm reports how much of the cache is reused.

    python examples/generate_kv_cache.py             # Prometheus on 127.0.0.1:9464 + OTLP to localhost:4317
    python examples/generate_kv_cache.py --requests 200 --hold 60

A tiny random-init Llama (nothing is downloaded, CPU) answers ``--requests``
prompts that start with the same system prefix. The prefix is prefilled once
into a ``DynamicCache``; each request generates from a copy of it, so the
prefix's keys and values are served from the cache instead of recomputed.
``otel_llm.instrument(model)`` counts every layer update of transformers' cache:
``llm_kv_cache_hits_total`` (entries reused), ``llm_kv_cache_lookups_total``
(reused + newly computed) and ``llm_kv_cache_hit_ratio`` (over the last 64
updates). Try PromQL ``llm_kv_cache_hit_ratio`` or
``rate(llm_kv_cache_hits_total[1m]) / rate(llm_kv_cache_lookups_total[1m])``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import otel_llm  # noqa: E402

VOCAB = 128
PREFIX = 48
QUESTION = 8
NEW_TOKENS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep serving after generating")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no early stop
    model = LlamaForCausalLM(config).eval()
    prefix = torch.randint(0, VOCAB, (1, PREFIX))

    with otel_llm.instrument(model) as telemetry:
        print(f"otel_llm: scrape {telemetry.prometheus_url or '(Prometheus endpoint disabled)'}", flush=True)
        print("otel_llm: try PromQL  llm_kv_cache_hit_ratio  or  "
              "rate(llm_kv_cache_hits_total[1m]) / rate(llm_kv_cache_lookups_total[1m])", flush=True)
        with torch.no_grad():
            shared = DynamicCache(config=model.config)
            model(input_ids=prefix, cache=shared, use_cache=True)
        for request in range(args.requests):
            prompt = torch.cat([prefix, torch.randint(0, VOCAB, (1, QUESTION))], dim=1)
            output = model.generate(prompt, cache=copy.deepcopy(shared), max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False)
            print(f"request {request}: {PREFIX} prefix tokens from the cache, {QUESTION} computed, "
                  f"{output.shape[1] - prompt.shape[1]} generated", flush=True)
        if args.hold > 0:
            print(f"otel_llm: generation done; serving for {args.hold:g} s more", flush=True)
            time.sleep(args.hold)
    print("done", flush=True)


if __name__ == "__main__":
    main()
