"""llm.grad.norm is the pre-clip norm the clip call computed; llm.grad.clipped_steps counts the steps it scaled."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.models import GPT

VOCAB = 64
LENGTH = 16
MAX_NORM = 1.0


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randint(0, VOCAB, (2, LENGTH), generator=g), torch.randint(0, VOCAB, (2, LENGTH), generator=g)


def gpt(lr: float) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, block_size=LENGTH, heads=4)
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def grad_norm(model: torch.nn.Module) -> float:
    """The global L2 norm of the gradients as they are now, in float64."""
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))


def clip_norm_(model: torch.nn.Module, how: str) -> torch.Tensor:
    """The three ways a loop clips: a list, a generator (consumed by the call), norm then clip."""
    if how == "list":
        return torch.nn.utils.clip_grad_norm_(list(model.parameters()), MAX_NORM)
    if how == "generator":
        return torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), MAX_NORM, norm)
    return norm


@pytest.mark.parametrize("how", ["list", "generator", "get_total_norm"])
def test_grad_norm_is_the_clips_pre_clip_norm_and_clipped_steps_are_counted_exactly(harness, how):
    model, optimizer = gpt(lr=3.0)  # large steps: norms cross the bound both ways
    h = harness(model, optimizer, sampling_interval=1)
    returned, clipped = [], 0
    for step in range(12):
        idx, targets = batch(step)
        _, loss = model(idx, targets)
        loss.backward()
        norm = clip_norm_(model, how)
        after = grad_norm(model)
        returned.append(float(norm))
        clipped += float(norm) > MAX_NORM
        assert after <= MAX_NORM * (1 + 1e-5)  # the clip still clips: the wrapper passed the parameters on
        optimizer.step()
        optimizer.zero_grad()
        m = h.collect()
        assert m.value("llm.grad.norm") == pytest.approx(float(norm), rel=1e-6)
        if step:
            decay = (returned[-2] - returned[-1]) / (returned[-2] + 1e-8)
            assert m.value("llm.grad.norm_decay_rate") == pytest.approx(decay, rel=1e-5, abs=1e-7)
    assert 0 < clipped < 12, "the run never crossed the bound in one direction; the test proves nothing"
    m = h.collect()
    assert m.value("llm.grad.clipped_steps") == clipped
    assert m.value("llm.train.steps") == 12


def test_clipped_steps_are_exact_between_sampled_steps_and_unclipped_steps_use_the_pre_step_norm(harness):
    model, optimizer = gpt(lr=3.0)
    h = harness(model, optimizer, sampling_interval=5)
    clipped = 0
    for step in range(11):
        idx, targets = batch(step)
        _, loss = model(idx, targets)
        loss.backward()
        if step != 10:  # the last step (sampled) does not clip: its norm is read at pre-step
            clipped += float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)) > MAX_NORM
        else:
            reference = grad_norm(model)
        optimizer.step()
        optimizer.zero_grad()
    m = h.collect()
    assert m.value("llm.grad.clipped_steps") == clipped
    assert m.value("llm.grad.norm") == pytest.approx(reference, rel=1e-5)
    assert m.value("llm.telemetry.sampled_steps") == 3


def test_decay_rate_between_sampled_steps_compares_the_clips_norms_of_consecutive_steps(harness):
    """Sampled every 4th step: the step before each sampled one is not sampled, yet its clip norm is kept."""
    model, optimizer = gpt(lr=3.0)
    h = harness(model, optimizer, sampling_interval=4)
    norms = []
    for step in range(9):
        idx, targets = batch(step)
        _, loss = model(idx, targets)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
        if step in (4, 8):
            decay = (norms[-2] - norms[-1]) / (norms[-2] + 1e-8)
            assert h.collect().value("llm.grad.norm_decay_rate") == pytest.approx(decay, rel=1e-5, abs=1e-7)


def test_a_clip_after_a_skipped_update_replaces_the_skipped_one(harness):
    """GradScaler-style: a step whose update was skipped clips again next iteration; only the taken step counts."""
    model, optimizer = gpt(lr=0.5)
    h = harness(model, optimizer, sampling_interval=1)
    idx, targets = batch(0)
    F.cross_entropy(model(idx)[0].reshape(-1, VOCAB), targets.reshape(-1)).mul(1000).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)  # scaled, but the update is skipped
    optimizer.zero_grad()
    _, loss = model(idx, targets)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)  # the taken step does not clip
    optimizer.step()
    m = h.collect()
    assert m.value("llm.grad.norm") == pytest.approx(float(norm), rel=1e-6)
    assert "llm.grad.clipped_steps" not in m.names()


def test_clipping_is_restored_exactly_at_shutdown(harness):
    before = (torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grads_with_norm_)
    h = harness()
    assert torch.nn.utils.clip_grad_norm_ is not before[0]
    h.session.shutdown()
    assert (torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grads_with_norm_) == before
