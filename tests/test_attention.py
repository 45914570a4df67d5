"""Attention signals #8-#11 equal references computed from full softmax probabilities.

Each test trains real models through ``otel_llm.Instrumentation`` with sampling
interval 1; the references (tests/attention_reference.py) recompute q, k and v
from the captured layer inputs in float64, never through the code under test.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otel_llm
from otel_llm.catalog import HEAD_ENTROPY_BUCKETS
from otel_llm.probes._attention_stats import query_positions
from tests.attention_reference import Capture, Reference, causal_padding_mask, reference_signals
from tests.conftest import rel_close
from tests.models import GPT
from tests.support.backends import free_port

VOCAB = 64
LENGTH = 12
GAUGES = ("llm.attention.head_divergence_max", "llm.attention.logit_max", "llm.attention.sink_ratio")


def bucket_counts(values: np.ndarray, bounds: tuple[float, ...]) -> list[int]:
    edges = [-math.inf, *bounds, math.inf]
    return [int(((values > lo) & (values <= hi)).sum()) for lo, hi in zip(edges, edges[1:])]


def hf_model(arch: str, impl: str, dropout: float = 0.0, layers: int = 2):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=64, attn_implementation=impl)
    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                               attn_pdrop=dropout, attn_implementation=impl, bos_token_id=1, eos_token_id=2)
        return tf.GPT2LMHeadModel(config)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
    config = cls[0](intermediate_size=64, num_key_value_heads=2, attention_dropout=dropout, **common)
    return cls[1](config)


def attention_modules(model, arch: str) -> list[nn.Module]:
    if arch == "nanogpt":
        return [block.attn for block in model.transformer.h]
    if arch == "gpt2":
        return [block.attn for block in model.transformer.h]
    return [layer.self_attn for layer in model.model.layers]


def hf_batch(step: int, padded: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(300 + step)
    ids = torch.randint(3, VOCAB, (3, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0  # left padding: the first query rows of this sequence have no key at all
        mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train_and_check(harness, model, arch: str, steps: int, make_batch, heads: int = 4, **config) -> None:
    """Train with interval 1 and compare every layer's signals with the reference at every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    h = harness(model, optimizer, sampling_interval=1, attention_queries=config.pop("attention_queries", 64),
                **config)
    capture = Capture(arch, attention_modules(model, arch), heads)
    entropies: dict[str, list[np.ndarray]] = {}
    for step in range(steps):
        batch = make_batch(step)
        out = model(**batch)
        loss = out[1] if isinstance(out, tuple) else out.loss
        loss.backward()
        qkv = capture.qkv()
        pad = batch.get("attention_mask")
        optimizer.step()
        optimizer.zero_grad()
        m = h.collect()
        layers = len(attention_modules(model, arch))
        assert len(qkv) == layers
        for layer, (q, k, v, scale) in enumerate(qkv):
            allowed = causal_padding_mask(q.shape[2], pad, q.shape[0])
            ref = reference_signals([(q, k, v, scale, allowed)])
            check_layer(m, str(layer), ref)
            entropies.setdefault(str(layer), []).append(ref.entropies)
        for layer, seen in entropies.items():
            check_entropy_histogram(m, layer, np.concatenate(seen))
        assert "llm.telemetry.nonfinite" not in m.names()
    capture.remove()


def check_layer(m, layer: str, ref: Reference) -> None:
    assert rel_close(m.value("llm.attention.logit_max", llm_layer=layer), ref.logit_max)
    assert rel_close(m.value("llm.attention.sink_ratio", llm_layer=layer), ref.sink_ratio)
    assert rel_close(m.value("llm.attention.head_divergence_max", llm_layer=layer), ref.divergence_max,
                     abs_tol=1e-8)


def check_entropy_histogram(m, layer: str, entropies: np.ndarray) -> None:
    (point,) = [p for p in m.points["llm.attention.head_entropy"] if p.attributes == {"llm.layer": layer}]
    assert list(point.explicit_bounds) == list(HEAD_ENTROPY_BUCKETS)
    assert point.count == entropies.size
    assert list(point.bucket_counts) == bucket_counts(entropies, HEAD_ENTROPY_BUCKETS)
    assert rel_close(point.sum, float(entropies.sum()))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left-padded"])
def test_transformers_models_match_reference(harness, arch, impl, padded):
    model = hf_model(arch, impl)
    train_and_check(harness, model, arch, steps=2, make_batch=lambda step: hf_batch(step, padded))


def test_nanogpt_matches_reference(harness):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)

    def batch(step):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, VOCAB, (3, 16), generator=g)
        return {"idx": idx, "targets": idx}

    train_and_check(harness, model, "nanogpt", steps=3, make_batch=batch)


def test_dropout_statistics_use_probabilities_before_dropout(harness):
    """Attention dropout is active (train mode, p=0.3); the signals are those of the undropped softmax."""
    for impl in ("sdpa", "eager"):
        model = hf_model("llama", impl, dropout=0.3)
        model.train()
        train_and_check(harness, model, "llama", steps=2, make_batch=lambda step: hf_batch(step, True))


def test_sdpa_and_eager_give_the_same_values(harness):
    values = {}
    for impl in ("sdpa", "eager"):
        model = hf_model("llama", impl)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        h = harness(model, optimizer, sampling_interval=1)
        model(**hf_batch(0, True)).loss.backward()
        optimizer.step()
        m = h.collect()
        values[impl] = {(name, p.attributes["llm.layer"]): p.value for name in GAUGES for p in m.points[name]}
        h.session.shutdown()
    assert values["sdpa"].keys() == values["eager"].keys() and len(values["sdpa"]) == 6
    for key, value in values["sdpa"].items():
        assert rel_close(values["eager"][key], value), key


def test_query_positions_are_bounded_and_include_the_last():
    for length in (1, 2, 5, 16, 100, 1000):
        for wanted in (1, 2, 3, 7, 64, 2000):
            positions = query_positions(length, wanted, torch.device("cpu")).tolist()
            assert len(positions) == min(length, wanted)
            assert positions[-1] == length - 1
            assert positions == sorted(set(positions)) and positions[0] >= 0


@pytest.mark.parametrize("queries", [1, 5])
def test_subsampled_queries(harness, queries):
    """With fewer queries than positions, the signals are those of the sampled rows (always the last)."""
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    h = harness(model, optimizer, sampling_interval=1, attention_queries=queries)
    capture = Capture("nanogpt", attention_modules(model, "nanogpt"), 4)
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    model(idx, idx)[1].backward()
    qkv = capture.qkv()
    optimizer.step()
    m = h.collect()
    rows = [15] if queries == 1 else query_positions(16, queries, torch.device("cpu")).tolist()
    assert len(qkv) == 2
    for layer, (q, k, v, scale) in enumerate(qkv):
        ref = reference_signals([(q, k, v, scale, causal_padding_mask(16, None, 2))], positions=rows)
        check_layer(m, str(layer), ref)
        check_entropy_histogram(m, str(layer), ref.entropies)
        full = reference_signals([(q, k, v, scale, causal_padding_mask(16, None, 2))])
        assert not rel_close(ref.sink_ratio, full.sink_ratio)  # the subsample really is a subsample


class MaskedBlock(nn.Module):
    """Calls SDPA with the mask, scale, dropout and GQA options under test; keeps q/k/v for the reference."""

    def __init__(self, dim: int, heads: int, kv_heads: int, scale: float | None, dropout: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.scale, self.dropout = heads, kv_heads, scale, dropout
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)
        self.seen: tuple[torch.Tensor, ...] = ()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = (z.view(b, t, self.kv_heads, -1).transpose(1, 2) for z in self.kv(x).chunk(2, dim=-1))
        self.seen = (q.detach(), k.detach(), v.detach())
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.kv_heads != self.heads)
        return x + self.o(y.nan_to_num().transpose(1, 2).reshape(b, t, -1))


class MaskedModel(nn.Module):
    def __init__(self, heads=4, kv_heads=4, scale=None, dropout=0.0, layers=2, dim=32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(MaskedBlock(dim, heads, kv_heads, scale, dropout) for _ in range(layers))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx, mask=None, causal=False):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, mask, causal)
        return F.cross_entropy(self.head(x).flatten(0, 1), idx.flatten())


def mask_cases(length: int = 10):
    g = torch.Generator().manual_seed(7)
    random_bool = torch.rand(2, 1, length, length, generator=g) > 0.4
    random_bool[:, :, 0] = False  # a fully masked query row
    random_bool[1, :, 3] = False
    additive = torch.randn(2, 4, length, length, generator=g)
    additive[0, :, 2, :] = -math.inf  # fully masked through the additive mask
    additive[..., 5] = -math.inf
    causal_bool = torch.ones(length, length, dtype=torch.bool).tril()
    return {
        "bool-broadcast": dict(mask=random_bool),
        "additive-per-head": dict(mask=additive),
        "is-causal": dict(causal=True),
        "causal-bool-2d": dict(mask=causal_bool),
        "gqa-enable": dict(kv_heads=2, causal=True),
        "gqa-masked": dict(kv_heads=1, mask=random_bool),
        "scale": dict(scale=0.9, causal=True),
        "dropout": dict(dropout=0.5, mask=random_bool),
    }


def reference_mask(case: dict, length: int) -> torch.Tensor:
    mask = case.get("mask")
    if case.get("causal"):
        return torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    return mask if mask.dtype == torch.bool else mask.double()


@pytest.mark.parametrize("name", list(mask_cases()))
def test_sdpa_masks_gqa_scale_and_dropout(harness, name):
    case = mask_cases()[name]
    torch.manual_seed(0)
    model = MaskedModel(kv_heads=case.get("kv_heads", 4), scale=case.get("scale"), dropout=case.get("dropout", 0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    h = harness(model, optimizer, sampling_interval=1)
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    model(idx, case.get("mask"), case.get("causal", False)).backward()
    optimizer.step()
    m = h.collect()
    for layer, block in enumerate(model.blocks):
        q, k, v = (t.double() for t in block.seen)
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        scale = case.get("scale") or q.shape[-1] ** -0.5
        ref = reference_signals([(q, k, v, scale, reference_mask(case, 10))])
        check_layer(m, str(layer), ref)
        check_entropy_histogram(m, str(layer), ref.entropies)
        assert ref.entropies.size == 4
    assert "llm.telemetry.nonfinite" not in m.names()  # fully masked rows are excluded, not NaN


def test_unsupported_layouts_are_skipped_with_one_log_line(harness, caplog):
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 64)

        def forward(self, x):
            q = self.proj(x).view(1, 1, 2, 4, 8)  # a 5-D layout SDPA broadcasts but the probe does not read
            return F.scaled_dot_product_attention(q, q, q).sum()

    model = nn.Module()
    model.layers = nn.ModuleList([Odd()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    h = harness(model, optimizer, sampling_interval=1, layers_path="layers")
    caplog.set_level("WARNING", logger="otel_llm")
    for _ in range(2):
        model.layers[0](torch.ones(1, 8)).backward()
        optimizer.step()
    probe = h.session._probes.named("attention")
    assert probe.skipped_calls == 2
    assert len([r for r in caplog.records if "attention call skipped" in r.getMessage()]) == 1
    m = h.collect()
    assert m.value("llm.train.steps") == 2
    assert "llm.attention.logit_max" not in m.names()
    assert "llm.telemetry.nonfinite" not in m.names()  # nothing half-made was published


def test_layers_path_override_and_call_order_fallback(harness):
    """An explicit layers path attributes calls by layer; without any stack, call order gives the layer."""
    torch.manual_seed(0)
    model = MaskedModel(layers=3)
    blocks = model.blocks
    model.blocks = nn.ModuleList()  # hide the stack: the model now calls its blocks from a plain list
    model.forward = lambda idx, mask=None, causal=False: F.cross_entropy(  # type: ignore[method-assign]
        model.head(_run(list(blocks), model.embed(idx), causal)).flatten(0, 1), idx.flatten())
    model.hidden = blocks  # a ModuleList that is not called as a whole
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    values = {}
    for path in ("hidden", None):
        h = harness(model, optimizer, sampling_interval=1, layers_path=path)
        model(idx, None, True).backward()
        optimizer.step()
        m = h.collect()
        values[path] = {p.attributes["llm.layer"]: p.value for p in m.points["llm.attention.logit_max"]}
        h.session.shutdown()
    assert sorted(values["hidden"]) == ["0", "1", "2"]
    assert values["hidden"] == values[None]
    for layer, block in enumerate(blocks):
        q, k, v = (t.double() for t in block.seen)
        ref = reference_signals([(q, k, v, q.shape[-1] ** -0.5, causal_padding_mask(10, None, 2))])
        assert rel_close(values["hidden"][str(layer)], ref.logit_max)


def _run(blocks, x, causal):
    for block in blocks:
        x = block(x, None, causal)
    return x


def losses_of(arch: str, impl: str, instrumented: bool, harness) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB) if arch == "nanogpt" else hf_model(arch, impl, dropout=0.1)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if instrumented:
        harness(model, optimizer, sampling_interval=1)
    losses = []
    for step in range(5):
        if arch == "nanogpt":
            idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))
            loss = model(idx, idx)[1]
        else:
            loss = model(**hf_batch(step, True)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, torch.rand(3)


@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"),
                                       ("gpt2", "eager"), ("gpt2", "sdpa"), ("nanogpt", "")])
def test_losses_are_bitwise_identical_with_and_without_instrumentation(harness, arch, impl):
    bare, bare_rng = losses_of(arch, impl, False, harness)
    inst, inst_rng = losses_of(arch, impl, True, harness)
    assert all(torch.equal(a, b) for a, b in zip(bare, inst))
    assert torch.equal(bare_rng, inst_rng)  # dropout draws the same numbers: the probe used no RNG


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["item", "tolist", "cpu", "__float__", "__bool__", "numpy", "__int__"])
def test_no_host_sync_from_attention_hooks(harness, monkeypatch, impl, method):
    """Non-sampled steps: no sync at all from otel_llm; sampled steps: none from the attention/RoPE probes."""
    model = hf_model("llama", impl)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    harness(model, optimizer, sampling_interval=3)
    calls: list[str] = []
    original = getattr(torch.Tensor, method)
    probe_files = ("attention", "rope", "layers")

    def counting(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if os.sep + "otel_llm" + os.sep in caller and threading.current_thread() is threading.main_thread():
            calls.append(caller)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, method, counting)
    for step in range(4):  # steps 0 and 3 are sampled
        del calls[:]
        loss = model(**hf_batch(step, True)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (1, 2):
            assert calls == [], step
        else:
            assert not [c for c in calls if any(name in os.path.basename(c) for name in probe_files)]
    monkeypatch.undo()


def test_scrape_shows_every_layer(sessions):
    model = hf_model("llama", "sdpa", layers=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = otel_llm.Config(sampling_interval=1, exporters="prometheus", prometheus_port=free_port())
    session = otel_llm.Instrumentation(model, optimizer, config=config)
    sessions.append(session)
    for step in range(2):
        model(**hf_batch(step, True)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    session.flush(5.0)
    with urllib.request.urlopen(session.prometheus_url, timeout=5) as response:
        body = response.read().decode()
    lines = [line for line in body.splitlines() if line.startswith("llm_")]
    for layer in "012":
        buckets = [line for line in lines if line.startswith("llm_attention_head_entropy_bucket")
                   and f'llm_layer="{layer}"' in line]
        bounds = [line.split('le="')[1].split('"')[0] for line in buckets]
        assert [float(b) for b in bounds[:-1]] == list(HEAD_ENTROPY_BUCKETS) and bounds[-1] == "+Inf"
        assert 'le="+Inf"' in buckets[-1] and buckets[-1].endswith(" 8.0")  # 4 heads x 2 steps
        for gauge in ("llm_attention_head_divergence_max", "llm_attention_logit_max", "llm_attention_sink_ratio"):
            assert [line for line in lines if line.startswith(gauge + "{") and f'llm_layer="{layer}"' in line]
    assert [line for line in lines if line.startswith("llm_rope_angle_deviation_rad")]


class SoftmaxAttention(nn.Module):
    """nanoGPT's non-flash path: explicit q·kᵀ, -inf causal mask, F.softmax, dropout, @ v."""

    def __init__(self, dim: int = 32, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.c_attn(x).split(c, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).tril().logical_not(), float("-inf"))
        att = self.drop(F.softmax(att, dim=-1))
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, c))


def test_explicit_softmax_attention_matches_reference_without_divergence(harness):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    for block in model.transformer.h:
        block.attn = SoftmaxAttention(dropout=0.2)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    h = harness(model, optimizer, sampling_interval=1, attention_queries=7)
    capture = Capture("nanogpt", attention_modules(model, "nanogpt"), 4)
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    model(idx, idx)[1].backward()
    qkv = capture.qkv()
    optimizer.step()
    m = h.collect()
    rows = query_positions(16, 7, torch.device("cpu")).tolist()
    for layer, (q, k, v, scale) in enumerate(qkv):
        ref = reference_signals([(q, k, v, scale, causal_padding_mask(16, None, 2))], positions=rows)
        assert rel_close(m.value("llm.attention.logit_max", llm_layer=str(layer)), ref.logit_max)
        assert rel_close(m.value("llm.attention.sink_ratio", llm_layer=str(layer)), ref.sink_ratio)
        check_entropy_histogram(m, str(layer), ref.entropies)
    assert "llm.attention.head_divergence_max" not in m.names()


def test_gpt2_reordered_upcast_eager_attention_is_seen_through_softmax(harness):
    """GPT-2's reorder_and_upcast_attn path bypasses eager_attention_forward and calls softmax itself."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           attn_implementation="eager", reorder_and_upcast_attn=True, bos_token_id=1, eos_token_id=2)
    model = tf.GPT2LMHeadModel(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    h = harness(model, optimizer, sampling_interval=1)
    capture = Capture("gpt2", attention_modules(model, "gpt2"), 4)
    batch = hf_batch(0, True)
    model(**batch).loss.backward()
    optimizer.step()
    m = h.collect()
    for layer, (q, k, v, scale) in enumerate(capture.qkv()):
        ref = reference_signals([(q, k, v, scale, causal_padding_mask(LENGTH, batch["attention_mask"], 3))])
        assert rel_close(m.value("llm.attention.logit_max", llm_layer=str(layer)), ref.logit_max)
        assert rel_close(m.value("llm.attention.sink_ratio", llm_layer=str(layer)), ref.sink_ratio)
        check_entropy_histogram(m, str(layer), ref.entropies)


def test_long_batches_are_processed_in_chunks_with_the_same_values(harness, monkeypatch):
    """A logit budget smaller than one batch splits the work; the sums are the same as in one piece."""
    from otel_llm.probes import _attention_stats as attention_stats

    values = {}
    parts: list[int] = []
    original = attention_stats._batch_chunks
    monkeypatch.setattr(attention_stats, "_batch_chunks", lambda *a: parts.append(len(original(*a))) or original(*a))
    for budget in (1 << 24, 4 * 12 * 12):  # whole batch / one sequence at a time
        parts.clear()
        monkeypatch.setattr(attention_stats, "_CHUNK_LOGITS", budget)
        model = hf_model("llama", "sdpa")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        h = harness(model, optimizer, sampling_interval=1)
        model(**hf_batch(0, True)).loss.backward()
        optimizer.step()
        m = h.collect()
        values[budget] = {(n, p.attributes["llm.layer"]): p.value for n in GAUGES for p in m.points[n]}
        values[budget]["entropy"] = sum(p.sum for p in m.points["llm.attention.head_entropy"])
        assert parts == ([1, 1] if budget == 1 << 24 else [3, 3])  # one call per layer
        h.session.shutdown()
    small, whole = values[4 * 12 * 12], values[1 << 24]
    assert small.keys() == whole.keys()
    for key, value in whole.items():
        assert rel_close(small[key], value, rel=1e-6), key


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_call_once(harness, reentrant):
    """Checkpointed layers replay their forward during backward; the replay is not measured again."""
    model = hf_model("llama", "sdpa")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    train_and_check(harness, model, "llama", steps=2, make_batch=lambda step: hf_batch(step, True))


def test_shutdown_restores_every_wrapped_function(harness):
    import transformers.models.llama.modeling_llama as llama_module

    originals = (F.scaled_dot_product_attention, F.softmax, llama_module.eager_attention_forward)
    first = harness(hf_model("llama", "eager"), sampling_interval=1)
    second = harness(hf_model("llama", "eager"), sampling_interval=1)
    assert llama_module.eager_attention_forward is not originals[2]
    assert F.scaled_dot_product_attention is not originals[0] and F.softmax is not originals[1]
    first.session.shutdown()
    assert llama_module.eager_attention_forward is not originals[2]  # still used by the second session
    second.session.shutdown()
    assert (F.scaled_dot_product_attention, F.softmax, llama_module.eager_attention_forward) == originals
