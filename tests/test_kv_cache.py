"""#16 from transformers' caches during generate(): counters and hit ratio equal the reference arithmetic.

A layer update that finds c entries per row in the cache and adds n reuses
c * rows and adds n * rows entries. Greedy generation of N tokens from a prompt
of length T, c of whose tokens are already cached, makes per layer one prefill
update (reused c, added T - c) and N - 1 decode updates (reused T + i, added 1).
The hit ratio is over the last 64 updates, in the order the layers make them.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tests.conftest import rel_close

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402
from transformers.cache_utils import Cache  # noqa: E402

VOCAB = 64
LAYERS = 2
NEW_TOKENS = 5


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no early stop: N tokens exactly
    return LlamaForCausalLM(config).eval()


def generation_updates(rows: int, prompt: int, cached: int, new_tokens: int = NEW_TOKENS) -> list[tuple[int, int]]:
    """(reused, added) of every layer update of one greedy generate() call."""
    steps = [(cached, prompt - cached)] + [(prompt + i, 1) for i in range(new_tokens - 1)]
    return [(reused * rows, added * rows) for reused, added in steps for _ in range(LAYERS)]


def prefill_updates(rows: int, tokens: int) -> list[tuple[int, int]]:
    return [(0, tokens * rows)] * LAYERS


def expect(m, updates: list[tuple[int, int]]) -> None:
    hits = sum(reused for reused, _ in updates)
    lookups = sum(reused + added for reused, added in updates)
    window = updates[-64:]
    ratio = sum(r for r, _ in window) / sum(r + a for r, a in window)
    assert m.value("llm.kv_cache.hits") == hits
    assert m.value("llm.kv_cache.lookups") == lookups
    assert rel_close(m.value("llm.kv_cache.hit_ratio"), ratio)


def greedy(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def prompts(rows: int = 2, prefix: int = 10, suffix: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, VOCAB, (1, prefix), generator=g).expand(rows, prefix)
    return shared, torch.cat([shared, torch.randint(0, VOCAB, (rows, suffix), generator=g)], dim=1)


def test_shared_prefix_generation_twice_matches_the_arithmetic(harness):
    model = tiny_llama()
    prefix, prompt = prompts()
    rows, p, t = prompt.shape[0], prefix.shape[1], prompt.shape[1]
    h = harness(model, None)
    updates: list[tuple[int, int]] = []

    greedy(model, prompt)  # no reuse: the whole prompt is computed
    updates += generation_updates(rows, t, cached=0)
    expect(h.collect(), updates)
    cold = h.collect().value("llm.kv_cache.hit_ratio")

    with torch.no_grad():  # prefill the shared prefix once ...
        prefilled = DynamicCache(config=model.config)
        model(input_ids=prefix, cache=prefilled, use_cache=True)
    updates += prefill_updates(rows, p)
    for _ in range(2):  # ... and reuse it for two generations
        greedy(model, prompt, cache=copy.deepcopy(prefilled))
        updates += generation_updates(rows, t, cached=p)
        expect(h.collect(), updates)
    assert h.collect().value("llm.kv_cache.hit_ratio") > cold


def test_static_cache_counts_like_the_dynamic_one(harness):
    model = tiny_llama()
    prefix, prompt = prompts(rows=1)
    h = harness(model, None)
    greedy(model, prompt, cache_implementation="static")
    updates = generation_updates(1, prompt.shape[1], cached=0)
    expect(h.collect(), updates)

    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(input_ids=prefix, cache=cache, use_cache=True)
    greedy(model, prompt, cache=cache)
    updates += prefill_updates(1, prefix.shape[1]) + generation_updates(1, prompt.shape[1], cached=prefix.shape[1])
    expect(h.collect(), updates)


def test_greedy_outputs_identical_with_and_without_instrumentation(harness):
    model = tiny_llama()
    _, prompt = prompts()
    bare = [greedy(model, prompt), greedy(model, prompt, cache_implementation="static")]
    h = harness(model, None)
    instrumented = [greedy(model, prompt), greedy(model, prompt, cache_implementation="static")]
    assert all(torch.equal(a, b) for a, b in zip(bare, instrumented))
    assert h.collect().value("llm.kv_cache.lookups") > 0


class SomeOtherCache(DynamicCache):
    """A cache class otel_llm does not know (subclasses may store entries differently)."""


def test_unknown_cache_class_is_ignored_with_one_log_line(harness, caplog):
    model = tiny_llama()
    _, prompt = prompts()
    expected = greedy(model, prompt)
    caplog.set_level(logging.INFO, logger="otel_llm")
    h = harness(model, None)
    outputs = [greedy(model, prompt, cache=SomeOtherCache()) for _ in range(2)]
    assert all(torch.equal(out, expected) for out in outputs)
    assert "llm.kv_cache.lookups" not in h.collect().names()
    lines = [r for r in caplog.records if "SomeOtherCache" in r.getMessage()]
    assert len(lines) == 1


def test_training_forwards_are_not_cache_reuse(harness):
    model = tiny_llama().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    h = harness(model, optimizer, sampling_interval=1)
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # transformers fills a throwaway DynamicCache here
    optimizer.step()
    h.session.record_kv_cache(reused=3, added=1)  # the manual API still counts
    m = h.collect()
    assert m.value("llm.kv_cache.hits") == 3 and m.value("llm.kv_cache.lookups") == 4


def test_shutdown_restores_cache_update(harness):
    original = Cache.update
    h = harness(tiny_llama(), None)
    assert Cache.update is not original
    h.session.shutdown()
    assert Cache.update is original
