"""Guards act on training exactly as configured, and only when enabled.

The decay rate is scripted through :mod:`tests.support.scripted` (the gradient
norm of every step is chosen), so each expected trigger step, learning rate and
clipped norm is computed here from the script, not read from otel_llm.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch

from otel_llm.catalog import GUARD_ACTIONS, TRAIN_SKIPPED_STEPS, TRAIN_STEPS
from otel_llm.config import Config
from otel_llm.guards.policy import ClipOnRebound, LrBackoff
from tests.models import GPT
from tests.support.scripted import Scripted, norms_for

VOCAB = 64


def gpt_step(model, optimizer, generator, poison=False):
    idx = torch.randint(0, VOCAB, (2, 16), generator=generator)
    _, loss = model(idx, idx)
    loss.backward()
    if poison:
        next(model.parameters()).grad.view(-1)[3] = float("nan")
    optimizer.step()
    optimizer.zero_grad()


def snapshot(model, optimizer):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())


def assert_same(before, after):
    (params_a, state_a), (params_b, state_b) = before, after
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    for key, slot in state_a["state"].items():
        for name, value in slot.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b["state"][key][name])), name


def test_skip_nonfinite_leaves_parameters_and_state_bitwise_unchanged_and_counts_one(harness, caplog):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, guards="skip_nonfinite", sampling="fixed", sampling_interval=2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        gpt_step(model, optimizer, generator)
    before = snapshot(model, optimizer)
    with caplog.at_level(logging.WARNING, logger="otel_llm.guards"):
        idx = torch.randint(0, VOCAB, (2, 16), generator=generator)
        _, loss = model(idx, idx)
        loss.backward()
        first = next(model.parameters())
        first.grad.view(-1)[3] = float("nan")
        optimizer.step()
        assert math.isnan(first.grad.view(-1)[3].item())  # the loop still sees its gradients
        optimizer.zero_grad()
    assert_same(before, snapshot(model, optimizer))
    assert [r.getMessage() for r in caplog.records if "skip_nonfinite" in r.getMessage()] == [
        "otel_llm: guard skip_nonfinite at step 2: the gradients hold NaN/Inf: the update is not applied"]
    for _ in range(3):
        gpt_step(model, optimizer, generator)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before[0][0], first.detach())  # training went on
    metrics = h.collect()
    assert metrics.value(TRAIN_SKIPPED_STEPS) == 1
    assert metrics.value(GUARD_ACTIONS, llm_guard_action="skip_nonfinite") == 1
    assert metrics.value(TRAIN_STEPS) == 5


def test_without_guards_a_nan_gradient_reaches_the_parameters_as_before(harness):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling="fixed", sampling_interval=2)
    generator = torch.Generator().manual_seed(0)
    gpt_step(model, optimizer, generator)
    gpt_step(model, optimizer, generator, poison=True)
    assert math.isnan(next(model.parameters()).view(-1)[3].item())
    metrics = h.collect()
    assert TRAIN_SKIPPED_STEPS not in metrics.names() and GUARD_ACTIONS not in metrics.names()
    assert metrics.value(TRAIN_STEPS) == 2


def test_training_is_bitwise_identical_with_a_guard_enabled_that_never_acts(harness):
    def run(guards):
        torch.manual_seed(0)
        model = GPT(vocab=VOCAB)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if guards is not None:
            harness(model, optimizer, guards=guards, sampling="fixed", sampling_interval=1)
        generator = torch.Generator().manual_seed(0)
        for _ in range(4):
            gpt_step(model, optimizer, generator)
        return [p.detach().clone() for p in model.parameters()]

    bare = run(None)
    assert all(torch.equal(a, b) for a, b in zip(bare, run("skip_nonfinite")))


# -- lr_backoff ---------------------------------------------------------------------------
INTERVAL, STEPS, LR = 2, 26, 0.1
# sampled steps 0, 2, 4, ...; step 0 has no decay rate; 6 breaks the first streak
DECAYS = {t: (0.5 if t == 6 else 0.9) for t in range(2, STEPS, INTERVAL)}


def backoff_steps(decays, patience, cooldown, threshold=0.8):
    """The steps a backoff is taken at, from the scripted decay rates (the rule, restated)."""
    taken, streak, quiet_until = [], 0, -1
    for step in sorted(decays):
        if step <= quiet_until:
            continue
        streak = streak + 1 if decays[step] > threshold else 0
        if streak == patience:
            taken.append(step)
            streak, quiet_until = 0, step + cooldown
    return taken


def run_scripted(harness, norms, *, scheduler_factory=None, **config):
    model = Scripted()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = scheduler_factory(optimizer) if scheduler_factory else None
    h = harness(model, optimizer, sampling="fixed", sampling_interval=INTERVAL, **config)
    if scheduler is not None:
        h.session.follow_scheduler(scheduler)
    actions, lrs = [], []
    h.session.on_guard(actions.append)
    for norm in norms:
        model.loss(norm).backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return h, actions, lrs


def test_lr_backoff_acts_at_the_kth_sampled_step_with_the_expected_rate_and_respects_the_cooldown(harness):
    expected_steps = backoff_steps(DECAYS, patience=3, cooldown=4)
    assert expected_steps == [12, 22]  # 2, 4 then 6 breaks; 8, 10, 12; 14 and 16 are inside the cooldown
    h, actions, lrs = run_scripted(harness, norms_for(DECAYS, STEPS), guards="lr_backoff",
                                   guard_lr_backoff_patience=3, guard_lr_backoff_cooldown=4)
    assert [(a.action, a.step) for a in actions] == [("lr_backoff", s) for s in expected_steps]
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(LR * 0.95 ** sum(s <= step for s in expected_steps), rel=1e-12)
    assert actions[0].values["decay_rate"] == pytest.approx(0.9, rel=1e-6)
    assert h.collect().value(GUARD_ACTIONS, llm_guard_action="lr_backoff") == 2


def test_lr_backoff_scales_a_cosine_schedule(harness):
    expected_steps = backoff_steps(DECAYS, patience=3, cooldown=4)
    total = 40

    def cosine(optimizer):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)

    _, actions, lrs = run_scripted(harness, norms_for(DECAYS, STEPS), scheduler_factory=cosine,
                                   guards="lr_backoff", guard_lr_backoff_patience=3, guard_lr_backoff_cooldown=4)
    assert [a.step for a in actions] == expected_steps
    for step, lr in enumerate(lrs):  # after scheduler.step() of step t the epoch is t + 1
        schedule = LR * (1 + math.cos(math.pi * (step + 1) / total)) / 2
        assert lr == pytest.approx(schedule * 0.95 ** sum(s <= step for s in expected_steps), rel=1e-9)


def test_lr_backoff_scales_a_closed_form_schedule_through_its_base_rates(harness):
    expected_steps = backoff_steps(DECAYS, patience=3, cooldown=4)

    def linear(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1 - epoch / 100)

    _, _, lrs = run_scripted(harness, norms_for(DECAYS, STEPS), scheduler_factory=linear,
                             guards="lr_backoff", guard_lr_backoff_patience=3, guard_lr_backoff_cooldown=4)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(LR * (1 - (step + 1) / 100) * 0.95 ** sum(s <= step for s in expected_steps),
                                   rel=1e-12)


def test_lr_backoff_stops_at_its_floor():
    policy = LrBackoff(threshold=0.8, patience=1, factor=0.5, cooldown=0, floor=0.2)
    factors = [policy.observe(step, 0.9) for step in range(5)]
    assert factors[:2] == [0.5, 0.5] and factors[2] == pytest.approx(0.8) and factors[3:] == [None, None]
    assert policy.scale == pytest.approx(0.2)


# -- clip_on_rebound ----------------------------------------------------------------------
REBOUND = {2: -1.0, 4: -1.0}  # norm 2 after norm 1: decay rate -1 at sampled steps 2 and 4


def clip_run(harness, norms, loop_clips):
    """SGD at lr 1 (the update is the applied gradient): the actions, each step's applied norm, the harness."""
    model = Scripted()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    h = harness(model, optimizer, sampling="fixed", sampling_interval=INTERVAL, guards="clip_on_rebound",
                guard_clip_patience=2, guard_clip_steps=3, guard_clip_max_norm=0.5)
    actions, applied = [], []
    h.session.on_guard(actions.append)
    for norm in norms:
        before = model.w.detach().clone()
        model.loss(norm).backward()
        if loop_clips:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # the loop's own clipping, never binding here
        optimizer.step()
        optimizer.zero_grad()
        applied.append(float((before - model.w.detach()).norm()))
    return actions, applied, h


def test_clip_on_rebound_clips_exactly_the_m_steps_after_the_trigger(harness):
    norms = norms_for(REBOUND, 14)
    actions, applied, h = clip_run(harness, norms, loop_clips=False)
    assert [(a.action, a.step) for a in actions] == [("clip_on_rebound", 4)]
    for step, (norm, got) in enumerate(zip(norms, applied)):
        # torch's rule: scale by max_norm / (norm + 1e-6) when that is below 1
        expected = norm * min(1.0, 0.5 / (norm + 1e-6)) if step in (5, 6, 7) else norm
        assert got == pytest.approx(expected, rel=1e-6), step
    assert h.collect().value(GUARD_ACTIONS, llm_guard_action="clip_on_rebound") == 1


def test_clip_on_rebound_leaves_a_loop_that_clips_alone(harness):
    norms = norms_for(REBOUND, 10)
    actions, applied, _ = clip_run(harness, norms, loop_clips=True)
    assert actions == []
    assert applied == pytest.approx(norms, rel=1e-6)


def test_clip_windows_do_not_extend_and_reopen_after_they_end():
    policy = ClipOnRebound(threshold=-0.1, patience=1, steps=3)
    assert [policy.observe(step, -1.0) for step in (0, 2, 4)] == [True, False, True]
    assert [s for s in range(10) if policy.clips(s)] == [5, 6, 7]


# -- configuration ------------------------------------------------------------------------
def test_guards_come_from_the_environment_and_bad_names_are_refused(monkeypatch):
    monkeypatch.setenv("OTEL_LLM_GUARDS", "lr_backoff, skip_nonfinite")
    monkeypatch.setenv("OTEL_LLM_GUARD_CLIP_THRESHOLD", "-0.25")
    config = Config()
    assert config.guards == ("lr_backoff", "skip_nonfinite") and config.guard_clip_threshold == -0.25
    assert Config(guards="none").guards == () and Config().guard_lr_backoff_factor == 0.95
    with pytest.raises(ValueError, match="skip_nonfinite"):
        Config(guards="skip_nan")
    monkeypatch.setenv("OTEL_LLM_GUARDS", "skip_nan")
    assert Config().guards == ()  # a typo in a job spec warns and falls back to no guards


# -- two ranks ----------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_with_different_decay_rates_take_the_same_actions_at_the_same_steps(tmp_path):
    from tests.test_distributed import clean_env, finish, results, torchrun

    worker = Path(__file__).resolve().parent / "dist" / "guards_worker.py"
    finish(torchrun(2, str(worker), "--out", str(tmp_path), env=clean_env(), cwd=tmp_path))
    ranks = results(tmp_path, 2)
    # backoff on the highest rank's rate (rank 0: 2, 4, 6 above 0.8), clipping on the lowest (rank 1: 8, 10)
    assert ranks[0]["actions"] == ranks[1]["actions"] == [["lr_backoff", 6], ["clip_on_rebound", 10]]
    assert ranks[0]["lrs"] == ranks[1]["lrs"] == [0.1] * 6 + [0.1 * 0.95] * 10


# -- cost ---------------------------------------------------------------------------------
def test_skip_nonfinite_reads_one_flag_per_step_and_the_other_guards_nothing_off_sampled_steps(harness):
    from tests.reliability.test_training_faults import SyncCounter

    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    harness(model, optimizer, sampling="fixed", sampling_interval=4,
            guards="skip_nonfinite,lr_backoff,clip_on_rebound")
    generator = torch.Generator().manual_seed(0)
    per_step = []
    for _ in range(5):  # steps 0 and 4 are sampled
        counter = SyncCounter()
        gpt_step(model, optimizer, generator)
        counter.undo()
        per_step.append(counter.calls)
    flag = ("item", "nonfinite.py:has_nonfinite")
    assert per_step[1:4] == [[flag]] * 3
    assert per_step[4] == [flag, ("cpu", "transfer.py:transfer"), ("numpy", "transfer.py:transfer")]


# -- log records and callbacks -------------------------------------------------------------
def test_an_action_is_one_log_record_and_on_anomaly_gets_each_anomaly(monkeypatch, sessions):
    from tests.conftest import Harness
    from tests.support.receivers import GrpcMetricsReceiver
    from tests.test_anomaly_events import logs_env

    with GrpcMetricsReceiver() as receiver:
        logs_env(monkeypatch, "grpc", receiver.port)
        torch.manual_seed(0)
        model = GPT(vocab=VOCAB)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        harness = Harness(model, optimizer, sampling_interval=1, guards="skip_nonfinite")
        sessions.append(harness.session)
        generator = torch.Generator().manual_seed(0)
        for step in range(4):
            gpt_step(model, optimizer, generator, poison=step == 2)
        metrics = harness.collect()
        assert receiver.logs.wait_for(1, timeout=5)
        records = [r for r in receiver.logs.records() if r.event_name == "llm.guard"]
    (record,) = records
    assert record.attributes == {"llm.guard.action": "skip_nonfinite", "llm.step": 2}
    assert record.body == "guard skip_nonfinite at step 2: the gradients hold NaN/Inf: the update is not applied"
    assert metrics.value(GUARD_ACTIONS, llm_guard_action="skip_nonfinite") == 1


def test_on_anomaly_gets_every_anomaly_the_counter_counts(harness):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1)
    anomalies = []
    h.session.on_anomaly(lambda anomaly, threshold: anomalies.append((anomaly.signal, anomaly.step, threshold)))
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        gpt_step(model, optimizer, generator, poison=step == 2)  # no guard: the NaN norm is an anomaly
    metrics = h.collect()
    counted = {dict(p.attributes)["llm.signal"]: p.value for p in metrics.points["llm.anomaly.events"]}
    assert counted["llm.grad.norm"] >= 1
    assert len(anomalies) == sum(counted.values()) and ("llm.grad.norm", 2, 6.5) in anomalies
