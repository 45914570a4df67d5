"""Smoke test of the anomaly evaluation harness (benchmarks/anomaly_eval.py): a few steps recorded and judged."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

import otel_llm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import anomaly_eval  # noqa: E402
import anomaly_runs  # noqa: E402


@pytest.fixture(scope="module")
def poisoned() -> anomaly_runs.Recording:
    """The README demo for 12 steps (all sampled: warm-up) with a NaN batch at step 9."""
    demo = dataclasses.replace(anomaly_runs.workloads(Path("unused"))[0], steps=12)
    return anomaly_runs.record(demo, "nan_batch", onset=9)


def test_the_recording_holds_every_sampled_step_with_nan_where_the_exporter_counted_it(poisoned):
    assert poisoned.steps == list(range(12))
    before, at = poisoned.points[8], poisoned.points[9]
    assert all(math.isfinite(v) for _, v in before["llm.train.loss"] + before["llm.grad.norm"])
    assert all(math.isnan(v) for _, v in at["llm.train.loss"] + at["llm.grad.norm"])
    layers = sorted(attrs["llm.layer"] for attrs, _ in at["llm.attention.logit_max"])
    assert layers == ["0", "1"]  # the series that went missing from the export came back as NaN, per layer
    text = json.dumps(poisoned.to_json())  # the cache file's form; NaN survives the round trip
    assert json.dumps(anomaly_runs.Recording.from_json(json.loads(text)).to_json()) == text


def test_a_replay_flags_the_fault_at_its_onset_on_a_sensible_signal(poisoned):
    events = anomaly_eval.replay(poisoned, otel_llm.Config(exporters="none"))
    outcome = anomaly_eval.judge(poisoned, events, within=3)
    assert outcome.delay == 0 and outcome.early == 0
    assert "train.loss" in outcome.signals and "grad.norm" in outcome.signals
