"""Sampling policies: the adaptive schedule step by step, and a session that follows it."""

from __future__ import annotations

import math

import pytest
import torch

from otel_llm.pipeline.sampler import AdaptiveSampler, FixedIntervalSampler, SamplingInputs
from tests.models import GPT

QUIET = SamplingInputs(loss=1.0)


def sampled_steps(sampler: AdaptiveSampler, steps: int, inputs=lambda step: QUIET) -> list[int]:
    """Drive ``sampler`` like a training loop: update after every sampled step."""
    taken = []
    for step in range(steps):
        if sampler.is_sampled(step):
            taken.append(step)
            sampler.update(step, inputs(step))
    return taken


def noisy_loss(step: int) -> SamplingInputs:
    """A loss with 10% relative spread: never a plateau at tolerance 0.01, never a spike at 4 sigma."""
    return SamplingInputs(loss=1.0 + 0.1 * math.sin(1.7 * step))


def test_fixed_interval_is_every_nth_step():
    sampler = FixedIntervalSampler(4)
    assert [s for s in range(13) if sampler.is_sampled(s)] == [0, 4, 8, 12]


def test_warm_up_samples_densely_then_the_minimum_interval():
    sampler = AdaptiveSampler(warmup=5, min_interval=3, max_interval=30, growth_steps=1000)
    # warm-up interval floor(3 (t + 1) / 5) after sampled step t, at least 1: 1, 1, 1, 2; then 3
    assert sampled_steps(sampler, 20, noisy_loss) == [0, 1, 2, 3, 5, 8, 11, 14, 17]
    assert sampler.interval == 3 and sampler.reason == "growth"


def test_interval_doubles_every_growth_steps_up_to_the_maximum():
    sampler = AdaptiveSampler(warmup=2, min_interval=2, max_interval=16, growth_steps=10)
    # after step t: interval = 2 * 2 ** ((t - 2) // 10), capped at 16
    expected = [0, 1, 3, 5, 7, 9, 11, 13, 17, 21, 25, 33, 49, 65, 81, 97]
    assert sampled_steps(sampler, 98, noisy_loss) == expected
    assert sampler.interval == 16


@pytest.mark.parametrize("trouble", [
    SamplingInputs(loss=5.0),  # a spike over the noisy history
    SamplingInputs(loss=1.0, nonfinite=True),
    SamplingInputs(loss=1.0, anomaly=True),
])
def test_trouble_tightens_to_the_minimum_and_restarts_growth(trouble):
    sampler = AdaptiveSampler(warmup=2, min_interval=2, max_interval=16, growth_steps=10)
    taken = sampled_steps(sampler, 50, noisy_loss)
    assert taken[-1] == 49 and sampler.interval == 16
    sampler.update(49, trouble)
    assert sampler.interval == 2 and sampler.reason in ("loss spike", "non-finite value", "anomaly")
    taken = []
    for step in range(50, 100):
        if sampler.is_sampled(step):
            taken.append(step)
            sampler.update(step, noisy_loss(step))
    # the growth clock restarted at 49: interval 2 * 2 ** ((t - 49) // 10) after sampled step t
    assert taken == [51, 53, 55, 57, 59, 63, 67, 71, 79, 95]


def test_spike_needs_history_and_a_margin_over_the_window():
    sampler = AdaptiveSampler(warmup=0, min_interval=1, max_interval=8, loss_window=10, spike_sigma=4.0)
    for step in range(4):  # fewer than half a window of losses: nothing is a spike yet
        sampler.update(step, SamplingInputs(loss=1.0 if step < 3 else 100.0))
    assert sampler.reason == "growth"

    def after_history(loss: float) -> AdaptiveSampler:
        sampler = AdaptiveSampler(warmup=0, min_interval=1, max_interval=8, loss_window=10, spike_sigma=4.0)
        for step in range(10):  # mean 1.0, std 0.005: the 1% floor applies, so the bound is 1 + 4 * 0.01
            sampler.update(step, SamplingInputs(loss=1.0 + 0.005 * (-1) ** step))
        sampler.update(10, SamplingInputs(loss=loss))
        return sampler

    assert after_history(1.039).reason == "growth"
    spiked = after_history(1.041)
    assert spiked.reason == "loss spike" and spiked.interval == 1


def test_plateau_relaxes_by_doubling():
    sampler = AdaptiveSampler(warmup=0, min_interval=4, max_interval=64, growth_steps=1000, loss_window=5,
                              plateau_tolerance=0.01)
    flat = lambda step: SamplingInputs(loss=2.0 + 0.001 * (step % 2))  # noqa: E731 - std/mean = 2.5e-4
    # losses at 0, 4, 8, 12 fill 4 of 5 slots; from the fifth sampled step on the window is a plateau
    assert sampled_steps(sampler, 40, flat) == [0, 4, 8, 12, 16, 24, 32]
    assert sampler.interval == 8 and sampler.reason == "growth + plateau"


def test_memory_pressure_above_the_limit_backs_off():
    sampler = AdaptiveSampler(warmup=0, min_interval=5, max_interval=100, memory_limit=0.85)
    sampler.update(0, SamplingInputs(loss=1.0, memory_pressure=0.85))
    assert sampler.interval == 5
    sampler.update(5, SamplingInputs(loss=1.1, memory_pressure=0.86))
    assert sampler.interval == 10 and sampler.reason == "growth + memory pressure"
    assert not sampler.is_sampled(10) and sampler.is_sampled(15)


def test_back_off_and_plateau_compound_but_never_pass_the_maximum():
    sampler = AdaptiveSampler(warmup=0, min_interval=10, max_interval=30, loss_window=2)
    sampler.update(0, SamplingInputs(loss=1.0))
    sampler.update(10, SamplingInputs(loss=1.0, memory_pressure=0.99))
    assert sampler.interval == 30  # 10 * 2 (plateau) * 2 (memory) = 40, capped
    assert sampler.reason == "growth + plateau + memory pressure"


def test_inputs_decode_from_the_agreed_vector():
    decoded = SamplingInputs.decode(torch.tensor([-math.inf, 1.0, 0.0, 0.5, 0.3, -0.1, 0.9, 0.2],
                                                 dtype=torch.float64).numpy())
    assert math.isnan(decoded.loss) and decoded.nonfinite and not decoded.anomaly and decoded.memory_pressure == 0.5
    assert (decoded.slowest_step, decoded.fastest_step) == (0.3, 0.1)  # MAX of t and of -t
    assert decoded.decay_high == 0.9 and decoded.decay_low == -0.2  # the lowest rate rides negated under MAX
    unknown = SamplingInputs.decode(torch.tensor([1.0, 0.0, 0.0, 0.0, -math.inf, -math.inf, -math.inf,
                                                  -math.inf]).numpy())
    assert unknown.decay_high is None and unknown.decay_low is None


def test_step_times_unknown_on_every_rank_decode_as_nan():
    from otel_llm.probes.base import StepValues

    vector = SamplingInputs.encode(StepValues(), 0, torch.device("cpu"))
    decoded = SamplingInputs.decode(vector.numpy())
    assert math.isnan(decoded.slowest_step) and math.isnan(decoded.fastest_step)
    timed = SamplingInputs.decode(SamplingInputs.encode(StepValues(), 0, torch.device("cpu"), 0.25).numpy())
    assert (timed.slowest_step, timed.fastest_step) == (0.25, 0.25)


@pytest.mark.parametrize("kwargs", [dict(min_interval=0), dict(min_interval=20, max_interval=10),
                                    dict(warmup=-1), dict(growth_steps=0), dict(loss_window=1)])
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        AdaptiveSampler(**kwargs)


def test_a_session_follows_the_adaptive_schedule_and_exports_its_interval(harness):
    torch.manual_seed(0)
    model = GPT(vocab=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling="adaptive", sampling_warmup=4, sampling_min_interval=3,
                sampling_max_interval=12, sampling_growth_steps=6, anomaly_detection=False)
    taken, intervals = [], []
    for step in range(30):
        if h.session.sampled:
            taken.append(step)
        idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        intervals.append(h.session.sampling_interval)
    # warm-up intervals floor(3 (t + 1) / 4) >= 1 (1, 1, 2), then 3 * 2 ** ((t - 4) // 6) after sampled step t
    # (quiet losses: no spike, no plateau)
    assert taken == [0, 1, 2, 4, 7, 10, 16, 28]
    metrics = h.collect()
    assert metrics.value("llm.telemetry.sampling_interval") == intervals[18] == 12
    assert metrics.value("llm.telemetry.sampled_steps") == len(taken)
