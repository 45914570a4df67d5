"""The training loop is never hurt: NaN/Inf, failing probes, host syncs, altered results."""

from __future__ import annotations

import logging
import os
import sys
import threading

import pytest
import torch

from otel_llm.probes.loss import LossProbe
from tests.models import GPT

VOCAB = 64


def train(model, optimizer, steps, seed=0, poison_at=None):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        if step == poison_at:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))
        idx = torch.randint(0, VOCAB, (2, 16), generator=g)
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def test_nan_loss_and_gradients_are_counted_not_sent(harness, caplog):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    h = harness(model, optimizer, sampling_interval=1)
    caplog.set_level(logging.WARNING)
    losses = train(model, optimizer, steps=5, poison_at=2)
    assert all(torch.isnan(loss) for loss in losses[2:])
    m = h.collect()
    assert m.value("llm.train.steps") == 5  # training went on
    nonfinite = {p.attributes["llm.signal"]: p.value for p in m.points["llm.telemetry.nonfinite"]}
    for signal in ("llm.train.loss", "llm.grad.norm", "llm.logits.z_loss", "llm.loss.token"):
        assert nonfinite[signal] == 3, signal  # steps 2, 3, 4
    # the gauges keep no NaN: a poisoned signal is simply absent from the latest snapshot
    assert "llm.train.loss" not in m.names() or all(p.value == p.value for p in m.points["llm.train.loss"])
    # histogram only ever received the finite losses of steps 0 and 1
    assert m.histogram("llm.loss.token").count == 2 * 32
    sdk_warnings = [r for r in caplog.records if r.name.startswith("opentelemetry")]
    assert sdk_warnings == []


def test_failing_probe_logs_once_and_the_rest_keeps_working(harness, caplog, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(LossProbe, "on_call", broken)
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    h = harness(model, optimizer, sampling_interval=1)
    caplog.set_level(logging.WARNING, logger="otel_llm")
    train(model, optimizer, steps=4)
    m = h.collect()
    failures = [r for r in caplog.records if "probe loss failed" in r.getMessage()]
    assert len(failures) == 1
    assert m.value("llm.train.steps") == 4
    assert m.value("llm.grad.norm") > 0
    assert "llm.loss.token" not in m.names()


def test_training_results_are_bitwise_identical_with_and_without_instrumentation(harness):
    def run(instrumented: bool):
        torch.manual_seed(0)
        model = GPT(vocab=VOCAB)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if instrumented:
            harness(model, optimizer, sampling_interval=1)
        losses = train(model, optimizer, steps=4)
        return losses, [p.detach().clone() for p in model.parameters()], torch.rand(3)

    bare_losses, bare_params, bare_rng = run(False)
    inst_losses, inst_params, inst_rng = run(True)
    assert all(torch.equal(a, b) for a, b in zip(bare_losses, inst_losses))
    assert all(torch.equal(a, b) for a, b in zip(bare_params, inst_params))
    assert torch.equal(bare_rng, inst_rng)  # the global RNG stream is untouched


@pytest.mark.parametrize("method", ["item", "tolist", "cpu", "__float__", "__bool__", "numpy"])
def test_no_host_device_sync_from_hooks_on_non_sampled_steps(harness, monkeypatch, method):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    harness(model, optimizer, sampling_interval=6)
    train(model, optimizer, steps=1)  # step 0 is sampled and publishes once
    calls = []
    original = getattr(torch.Tensor, method)

    def counting(self, *args, **kwargs):
        # torch's own optimizers call .item(): count only otel_llm's calls on the training thread
        caller = sys._getframe(1).f_code.co_filename
        if os.sep + "otel_llm" + os.sep in caller and threading.current_thread() is threading.main_thread():
            calls.append((method, caller))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, method, counting)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx = torch.randint(0, VOCAB, (2, 16), generator=g)
        mask = torch.ones_like(idx)
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        del mask
    monkeypatch.undo()
    assert calls == []
    if method == "cpu":  # control: the same counter sees the single transfer of sampled step 6
        monkeypatch.setattr(torch.Tensor, method, counting)
        train(model, optimizer, steps=1)
        monkeypatch.undo()
        assert [c[0] for c in calls] == ["cpu"]
