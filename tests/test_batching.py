"""Unsampled steps reach the exporter in batches, and nothing in a batch is lost or late past its bound."""

from __future__ import annotations

import time

import torch

from otel_llm.pipeline.batching import BATCH_WINDOW_SECONDS, PendingCounts
from otel_llm.pipeline.transfer import Publication
from tests.conftest import Harness, Metrics

NEVER = 10**6


def _tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_fast_unsampled_steps_are_handed_over_in_batches_and_all_counted() -> None:
    model, optimizer = _tiny()
    h = Harness(model, optimizer, sampling_interval=NEVER)
    submitted: list[Publication] = []
    submit = h.session._publisher.submit

    def counting(publication: Publication) -> None:
        submitted.append(publication)
        submit(publication)

    h.session._publisher.submit = counting  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        _train(model, optimizer, 200)
        elapsed = time.monotonic() - started
        before_flush = len(submitted)
        m = h.collect()
    finally:
        h.session.shutdown()
    # at most one hand-over per window while training runs (the first step, sampled, publishes on its own)
    assert before_flush <= 2 + elapsed / BATCH_WINDOW_SECONDS, (before_flush, elapsed)
    assert m.value("llm.train.steps") == 200
    durations = [p for p in m.points["llm.train.step.duration"]]
    assert sum(p.count for p in durations) == 199  # every step after the first has a duration


def test_a_paused_loop_has_its_last_steps_exported_without_a_flush() -> None:
    model, optimizer = _tiny()
    h = Harness(model, optimizer, sampling_interval=NEVER)
    try:
        _train(model, optimizer, 5)
        deadline = time.monotonic() + 10 * BATCH_WINDOW_SECONDS  # the bound is ~2 windows; slack for a loaded host
        steps = 0.0
        while time.monotonic() < deadline:
            points = Metrics(h.reader).points.get("llm.train.steps", [])
            steps = points[0].value if points else 0.0
            if steps == 5:
                break
            time.sleep(0.05)
        assert steps == 5
    finally:
        h.session.shutdown()


def test_pending_counts_sum_host_counters_keep_device_ones_and_keep_the_latest_gauge() -> None:
    pending = PendingCounts(window=3600.0)
    device = torch.tensor(7)
    assert not pending.add(1, [("llm.train.steps", {}, 1), ("llm.train.tokens", {}, 10)], [0.1], [], {})
    assert not pending.add(2, [("llm.train.steps", {}, 1), ("llm.train.tokens", {}, device)], [0.2], [],
                           {"g": (({}, 1.0),)})
    assert not pending.add(3, [("llm.train.steps", {}, 1)], [0.3], [], {"g": (({}, 2.0),)})
    pending.hand_over(lambda publication: None, stale_only=True)  # not due: nothing handed over
    out: list[Publication] = []
    pending.hand_over(out.append)
    (publication,) = out
    assert not publication.sampled and publication.step == 3
    assert sorted((name, value) for name, _, value in publication.counters if not isinstance(value, torch.Tensor)) \
        == [("llm.train.steps", 3), ("llm.train.tokens", 10)]
    assert [value for _, _, value in publication.counters if isinstance(value, torch.Tensor)] == [device]
    assert publication.durations == [0.1, 0.2, 0.3]
    assert publication.gauges == {"g": (({}, 2.0),)}
    pending.hand_over(out.append)
    assert len(out) == 1  # emptied


def test_a_batch_is_due_once_it_is_older_than_the_window() -> None:
    pending = PendingCounts(window=0.05)
    assert not pending.add(1, [("llm.train.steps", {}, 1)], [], [], {})
    time.sleep(0.06)
    assert pending.add(2, [("llm.train.steps", {}, 1)], [], [], {})
