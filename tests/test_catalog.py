"""The catalog matches the metric contract, written out here independently of the code.

Units are the ones the contract's "Units (revised)" rule picks: its dimensionless
``1`` stays only on names ending in ``ratio``; other dimensionless gauges have no
unit and the entropy / cross-entropy histograms the annotation ``{nat}``.
"""

from __future__ import annotations

from otel_llm.catalog import CATALOG, prometheus_name

G, C, H = "observable_gauge", "counter", "histogram"
CONTRACT = {
    # name: (instrument, unit, attributes, buckets)
    "llm.train.loss": (G, "", (), None),
    "llm.train.steps": (C, "{step}", (), None),
    "llm.train.tokens": (C, "{token}", (), None),
    "llm.train.step.duration": (H, "s", (), (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
    "llm.train.learning_rate": (G, "", ("llm.param.group",), None),
    "llm.grad.norm": (G, "", (), None),
    "llm.grad.clipped_steps": (C, "{step}", (), None),
    "llm.train.skipped_steps": (C, "{step}", (), None),  # DeepSpeed's skipped updates (not in SIGNALS.md yet)
    "llm.grad.norm_decay_rate": (G, "", (), None),
    "llm.grad.sparsity": (G, "", ("llm.param.group",), None),
    "llm.param.update_ratio": (G, "1", (), None),
    "llm.param.update_variance_ratio": (G, "1", (), None),
    "llm.loss.token": (H, "{nat}", (), (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)),
    "llm.loss.token_skewness": (G, "", (), None),
    "llm.logits.z_loss": (G, "", (), None),
    "llm.attention.head_entropy": (H, "{nat}", ("llm.layer",), (0.25, 0.5, 0.75, 1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0)),
    "llm.attention.head_divergence_max": (G, "", ("llm.layer",), None),
    "llm.attention.logit_max": (G, "", ("llm.layer",), None),
    "llm.attention.sink_ratio": (G, "1", ("llm.layer",), None),
    "llm.activation.sparsity": (G, "", ("llm.layer",), None),
    "llm.activation.outlier_ratio": (G, "1", ("llm.layer",), None),
    "llm.lora.rank_activation_ratio": (G, "1", ("llm.layer",), None),
    "llm.rope.angle_deviation": (G, "rad", (), None),
    "llm.kv_cache.hit_ratio": (G, "1", (), None),
    "llm.kv_cache.hits": (C, "{token}", (), None),
    "llm.kv_cache.lookups": (C, "{token}", (), None),
    "llm.memory.pressure": (G, "", ("llm.device",), None),
    "llm.telemetry.sampled_steps": (C, "{step}", (), None),
    "llm.telemetry.sampling_interval": (G, "{step}", (), None),
    "llm.telemetry.overhead": (H, "s", (), (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1)),
    "llm.telemetry.nonfinite": (C, "{event}", ("llm.signal",), None),
    "llm.anomaly.events": (C, "{event}", ("llm.signal",), None),
    # throughput and goodput (issue 20; not in SIGNALS.md yet)
    "llm.train.flops": (C, "{flop}", ("llm.flops.method",), None),
    "llm.train.mfu": (G, "", (), None),
    "llm.train.input_wait.duration": (H, "s", (), (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                                   30, 60)),
    "llm.train.compute.duration": (H, "s", (), (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                                                60)),
    "llm.train.checkpoint.duration": (H, "s", (), (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)),
    "llm.train.goodput": (G, "", (), None),
    "llm.train.last_step.timestamp": (G, "s", (), None),
    "llm.train.step.slowest": (G, "s", (), None),
    "llm.train.step.fastest": (G, "s", (), None),
    "llm.train.step.skew_ratio": (G, "1", (), None),
    "llm.memory.peak_allocated": (G, "By", ("llm.device",), None),
    "llm.memory.peak_reserved": (G, "By", ("llm.device",), None),
    "llm.guard.actions": (C, "{action}", ("llm.guard.action",), None),
}


def test_catalog_declares_exactly_the_contract():
    assert len({s.name for s in CATALOG}) == len(CATALOG), "a name is declared twice"
    assert {s.name: (s.instrument, s.unit, s.attributes, s.buckets) for s in CATALOG} == CONTRACT


def test_the_seventeen_signals_are_numbered():
    numbered = sorted((s.signal_number, s.name) for s in CATALOG if s.signal_number)
    assert [n for n, _ in numbered] == list(range(1, 18))
    assert numbered[15] == (16, "llm.kv_cache.hit_ratio")


def test_prometheus_names_follow_the_contract():
    by_name = {s.name: s for s in CATALOG}

    def prom(name):
        s = by_name[name]
        return prometheus_name(s.name, s.unit, s.instrument)

    assert prom("llm.kv_cache.hit_ratio") == "llm_kv_cache_hit_ratio"
    assert prom("llm.train.step.duration") == "llm_train_step_duration_seconds"
    assert prom("llm.rope.angle_deviation") == "llm_rope_angle_deviation_rad"
    assert prom("llm.train.steps") == "llm_train_steps_total"
    assert prom("llm.telemetry.sampling_interval") == "llm_telemetry_sampling_interval"
    assert prom("llm.train.flops") == "llm_train_flops_total"
    assert prom("llm.train.last_step.timestamp") == "llm_train_last_step_timestamp_seconds"
    assert prom("llm.memory.peak_allocated") == "llm_memory_peak_allocated_bytes"
    assert prom("llm.train.step.skew_ratio") == "llm_train_step_skew_ratio"


def test_thresholds_carry_the_contract_values():
    thresholds = {s.name: {(t.severity, t.op, t.value) for t in s.thresholds} for s in CATALOG if s.thresholds}
    assert thresholds["llm.param.update_variance_ratio"] == {("warning", ">=", 1e-5), ("critical", ">=", 1e-3)}
    assert thresholds["llm.memory.pressure"] == {("warning", ">", 0.85), ("critical", ">", 0.95)}
    assert thresholds["llm.grad.norm_decay_rate"] == {("warning", ">", 0.85), ("warning", "<", -0.1)}
    assert thresholds["llm.kv_cache.hit_ratio"] == {("warning", "<", 0.6)}
    assert thresholds["llm.lora.rank_activation_ratio"] == {("warning", ">", 0.9)}
    assert thresholds["llm.param.update_ratio"] == {("warning", ">", 1e-2)}
    assert thresholds["llm.telemetry.nonfinite"] == {("warning", "increase", 0.0)}
    assert thresholds["llm.train.step.skew_ratio"] == {("warning", ">", 0.2)}
    (stale,) = next(s for s in CATALOG if s.name == "llm.train.last_step.timestamp").thresholds
    assert (stale.severity, stale.op, stale.value, stale.statistic) == ("critical", ">", 600.0, "age")
    entropy = next(s for s in CATALOG if s.name == "llm.attention.head_entropy").thresholds[0]
    assert (entropy.op, entropy.value, entropy.statistic, entropy.for_duration) == (">", 1.8, "p50 per layer", "3m")


def test_every_family_has_one_producer_and_every_probe_is_a_family():
    """A probe's name is its catalog family; the three families without a probe are the session's own."""
    from otel_llm.probes.registry import PROBES

    probe_names = [cls.name for cls in PROBES]
    assert len(set(probe_names)) == len(probe_names)
    families = {spec.family for spec in CATALOG}
    assert "" not in families
    assert families == set(probe_names) | {"training", "telemetry", "guards"}
