"""Session surface: discovery without arguments, the instrumentor, KV-cache accounting, rank identity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from torch.nn.modules import module as nn_module
from torch.optim import optimizer as optim_module

import otel_llm
from otel_llm.zero_code.instrumentor import TorchInstrumentor
from tests.conftest import Metrics
from tests.models import GPT

VOCAB = 64
original_cross_entropy = F.cross_entropy  # as torch defines it, before any session patches it


def train(model, optimizer, steps, batch=(2, 16), mask_pad=0):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, batch, generator=g)
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def global_hook_counts():
    return (len(nn_module._global_forward_pre_hooks), len(nn_module._global_forward_hooks),
            len(optim_module._global_optimizer_pre_hooks), len(optim_module._global_optimizer_post_hooks))


def test_without_arguments_the_model_and_optimizer_are_found_as_they_run(harness):
    before = global_hook_counts()
    h = harness(sampling_interval=1)
    assert global_hook_counts()[:2] == (before[0] + 1, before[1] + 1)  # discovery hooks
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, optimizer, steps=3)
    # once the optimizer stepped, the global discovery hooks are gone and the model carries the token hook
    assert global_hook_counts()[:2] == before[:2]
    token_hook = h.session._probes.named("tokens")._on_model_forward
    assert token_hook in model._forward_hooks.values()
    m = h.collect()
    assert m.value("llm.train.steps") == 3
    assert m.value("llm.train.tokens") == 3 * 32  # step 0 counted through the discovery hooks
    assert m.value("llm.grad.norm") > 0
    h.session.shutdown()
    assert global_hook_counts() == before
    assert token_hook not in model._forward_hooks.values()
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_a_second_optimizer_is_ignored(harness):
    h = harness(sampling_interval=1)
    model_a, model_b = GPT(vocab=VOCAB), GPT(vocab=VOCAB)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.01)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.01)
    train(model_a, opt_a, steps=2)
    train(model_b, opt_b, steps=3)
    assert h.collect().value("llm.train.steps") == 2


def test_instrumentor_uninstrument_removes_everything_it_added():
    before = global_hook_counts()
    reader = InMemoryMetricReader()
    from opentelemetry.sdk.metrics import MeterProvider

    provider = MeterProvider(metric_readers=[reader])
    instrumentor = TorchInstrumentor()
    instrumentor.instrument(meter_provider=provider, config=otel_llm.Config(sampling_interval=1, exporters="none"))
    try:
        assert F.cross_entropy is not original_cross_entropy
        model = GPT(vocab=VOCAB)
        train(model, torch.optim.AdamW(model.parameters(), lr=1e-3), steps=2)
        assert instrumentor.session.flush(5.0)
        assert Metrics(reader).value("llm.train.steps") == 2
    finally:
        instrumentor.uninstrument()
    assert F.cross_entropy is original_cross_entropy
    assert global_hook_counts() == before
    instrumentor.uninstrument()  # harmless twice
    provider.shutdown()


def test_kv_cache_counters_and_sliding_window_ratio(harness):
    h = harness()
    reference = []
    for update in range(100):
        reused, added = (update % 7) * 10, 16
        h.session.record_kv_cache(reused=reused, added=added)
        reference.append((reused, added))
    window = reference[-64:]
    m = h.collect()
    assert m.value("llm.kv_cache.hits") == sum(r for r, _ in reference)
    assert m.value("llm.kv_cache.lookups") == sum(r + a for r, a in reference)
    expected = sum(r for r, _ in window) / sum(r + a for r, a in window)
    assert abs(m.value("llm.kv_cache.hit_ratio") - expected) < 1e-12


def test_rank_identity_from_torchrun_environment(monkeypatch, harness):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    h = harness()
    attributes = h.session.meter_provider._sdk_config.resource.attributes
    assert (attributes["llm.rank"], attributes["llm.world_size"]) == (3, 4)
    assert attributes["service.name"] == "otel-llm-training"


def test_a_session_whose_handle_is_dropped_keeps_running_until_shutdown():
    """``otel_llm.instrument(model, optimizer)`` inside a function that returns (the usual ``main()``):
    the session still measures, and is what exit shuts down and pushes."""
    import gc

    from otel_llm.session import active

    reader = InMemoryMetricReader()

    def main():
        torch.manual_seed(0)
        model = GPT(vocab=VOCAB)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        otel_llm.Instrumentation(model, optimizer, config=otel_llm.Config(exporters="none", sampling="fixed",
                                                                          sampling_interval=1),
                                 extra_readers=[reader])
        train(model, optimizer, steps=2)

    main()
    gc.collect()
    session = active()
    assert session is not None
    try:
        assert session.flush(5.0)
        assert Metrics(reader).value("llm.train.steps") == 2
    finally:
        session.shutdown()
    assert active() is None
