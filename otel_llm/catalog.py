"""The metric catalog: every signal otel_llm exports, declared once.

Instruments, Views, the README tables, the ``otel-llm catalog`` command, alert
rules, dashboards and which probes run are all derived from :data:`CATALOG`, so
a name, unit, attribute, bucket boundary or family changes in exactly one place.

Units follow one rule so that every path names a series alike. otel_llm's own
Prometheus endpoint maps unit ``1`` to no suffix, while the OTLP-to-Prometheus
translation of the Collector, VictoriaMetrics (``-opentelemetry.usePrometheusNaming``)
and Prometheus 3's OTLP receiver appends ``_ratio`` to a gauge with unit ``1``
(moving a ``ratio`` word of the name to its end). So:

* unit :data:`RATIO` (``1``) only on a metric whose name ends in ``ratio``;
* another dimensionless metric declares :data:`DIMENSIONLESS` (no unit) or a
  UCUM annotation such as :data:`NATS` (``{nat}``), which every path drops from
  the name;
* a real unit (``s``, ``rad``) adds the same suffix on every path.

:func:`unit_rule_broken` says what a spec does wrong; a test holds every
catalog entry to it and compares the names each path really produces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "ATTR_ANOMALY_SCORE",
    "ATTR_ANOMALY_THRESHOLD",
    "ATTR_DEVICE",
    "ATTR_FLOPS_METHOD",
    "ATTR_GUARD_ACTION",
    "ATTR_LAYER",
    "ATTR_PARAM_GROUP",
    "ATTR_SIGNAL",
    "ATTR_STEP",
    "AnomalyProfile",
    "CATALOG",
    "InstrumentKind",
    "MetricSpec",
    "Threshold",
    "BYTES",
    "DIMENSIONLESS",
    "NATS",
    "RATIO",
    "by_name",
    "family_signals",
    "prometheus_name",
    "unit_rule_broken",
]

InstrumentKind = Literal["counter", "histogram", "observable_gauge", "gauge", "up_down_counter"]

ATTR_LAYER: Final = "llm.layer"
"""0-based decoder layer index, as a string."""
ATTR_PARAM_GROUP: Final = "llm.param.group"
"""Optimizer param-group index, or a parameter family (all, lora_a, lora_b)."""
ATTR_DEVICE: Final = "llm.device"
"""torch device string, e.g. ``cpu`` or ``cuda:0``."""
ATTR_GUARD_ACTION: Final = "llm.guard.action"
"""The guard that acted: skip_nonfinite, lr_backoff or clip_on_rebound."""
ATTR_SIGNAL: Final = "llm.signal"
"""Name of the catalog signal an event is about."""
ATTR_FLOPS_METHOD: Final = "llm.flops.method"
"""How a FLOP count was obtained: ``counted`` (torch's FlopCounterMode) or ``analytic`` (the 6N formula)."""
ATTR_STEP: Final = "llm.step"
"""Optimizer step an event happened at (anomaly log records)."""
ATTR_ANOMALY_SCORE: Final = "llm.anomaly.score"
"""The detector's score of a flagged series (anomaly log records)."""
ATTR_ANOMALY_THRESHOLD: Final = "llm.anomaly.threshold"
"""The threshold the score went over (anomaly log records)."""


@dataclass(frozen=True)
class AnomalyProfile:
    """How the anomaly detector reads one gauge: how it moves when training is healthy.

    A learning model moves its signals for real (attention sharpens, the loss falls
    by half, the update ratio follows the learning-rate schedule), so the spreads
    the detector divides by never go below what such a run does.
    """

    log: bool
    """Judge log(value): the signal is a positive scale that changes by factors (non-positive values are skipped)."""
    spread_floor: float
    """Smallest baseline spread for the window-against-baseline (SAX) score, in the judged units."""
    jump_floor: float
    """Smallest forecast-error spread for the jump score, in the judged units."""


_SCALE: Final = AnomalyProfile(log=True, spread_floor=0.5, jump_floor=0.03)
"""Positive scales (loss, norms, ratios of norms, logits): a factor e^0.5 ~ 1.65 per window, 3% per sample."""
_FRACTION: Final = AnomalyProfile(log=False, spread_floor=0.05, jump_floor=0.03)
"""Fractions in [0, 1]: 5 percentage points per window, 3 per sample."""
_SIGNED: Final = AnomalyProfile(log=False, spread_floor=0.5, jump_floor=0.02)
"""Signed statistics around 0 (the gradient-norm decay rate)."""
_SKEWNESS: Final = AnomalyProfile(log=False, spread_floor=1.0, jump_floor=0.02)
"""Skewness of 512 token losses: a third moment, it drifts by about 1 per window as the loss falls."""
_ROPE: Final = AnomalyProfile(log=False, spread_floor=0.01, jump_floor=0.01)
"""RoPE angle error in rad: float rounding (1e-7..1e-5) is never an event; wrong positions (>= 0.1 rad) are."""

RATIO: Final = "1"
"""Unit of a dimensionless metric whose name ends in ``ratio`` (the only place ``1`` keeps every name alike)."""
DIMENSIONLESS: Final = ""
"""Unit of any other dimensionless value (a norm, a learning rate, a fraction not named a ratio)."""
BYTES: Final = "By"
"""Unit of a memory size in bytes (``_bytes`` suffix on every path)."""
NATS: Final = "{nat}"
"""Annotation for entropies and cross-entropies: informative in OTLP metadata, dropped from every series name."""


@dataclass(frozen=True)
class Threshold:
    """An alerting threshold on a signal; ``statistic`` says what is compared."""

    severity: Literal["warning", "critical"]
    op: Literal[">", "<", ">=", "<=", "increase"]
    value: float
    reason: str
    statistic: str = "value"
    for_duration: str = ""


@dataclass(frozen=True)
class MetricSpec:
    """One catalog entry: everything needed to create, view and document a metric."""

    name: str
    instrument: InstrumentKind
    unit: str
    description: str
    attributes: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    thresholds: tuple[Threshold, ...] = field(default=())
    signal_number: int | None = None
    family: str = ""
    """The probe (or pipeline stage) that produces it; empty for user-declared metrics."""
    anomaly: AnomalyProfile | None = None
    """How the anomaly detector judges this gauge; None: not judged (schedules, memory, the sampler itself)."""

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "instrument": self.instrument,
            "unit": self.unit,
            "description": self.description,
            "attributes": list(self.attributes),
            "buckets": list(self.buckets) if self.buckets is not None else None,
        }


def _words(name: str) -> list[str]:
    """The name's words as the OTLP translations split it (on every character a Prometheus name may not hold)."""
    return re.split(r"[^A-Za-z0-9:]+", name)


def _unit_suffix(unit: str) -> str:
    """The suffix a unit adds to a series name: none for ``1``, no unit and ``{annotations}``."""
    if unit in ("", RATIO) or unit.startswith("{"):
        return ""
    return {"s": "seconds", "By": "bytes"}.get(unit, unit)


def unit_rule_broken(spec: MetricSpec) -> str | None:
    """Why ``spec`` breaks the unit rule (so might get another name after OTLP translation), or None."""
    words = _words(spec.name)
    if spec.unit == RATIO and (words[-1] != "ratio" or words.count("ratio") > 1):
        return (f"{spec.name}: unit '1' belongs to names ending in one 'ratio' (the OTLP translations append _ratio "
                f"to a gauge with unit '1' and move its 'ratio' word to the end); declare DIMENSIONLESS ('') or an "
                f"annotation such as {NATS!r}, or end the name in 'ratio'")
    suffix = _unit_suffix(spec.unit)
    if suffix and suffix in words[:-1]:
        return f"{spec.name}: the translations add no _{suffix} to a name holding the word {suffix!r}"
    if spec.instrument == "counter" and "total" in words:
        return f"{spec.name}: the translations move a 'total' word of a counter's name to its end"
    return None


def prometheus_name(name: str, unit: str, instrument: str) -> str:
    """The series name of an OTel metric on every path: otel_llm's endpoint and OTLP translated by a backend.

    Holds for catalog metrics (they obey :func:`unit_rule_broken`); a user gauge
    with unit ``1`` whose name is not a ratio gains ``_ratio`` after OTLP
    translation.
    """
    base = name.replace(".", "_")
    suffix = _unit_suffix(unit)
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    if instrument == "counter":
        base += "_total"
    return base


# --- Core training metrics -------------------------------------------------

TRAIN_LOSS: Final = "llm.train.loss"
"""observable gauge, no unit: mean training loss of the latest sampled step."""
TRAIN_STEPS: Final = "llm.train.steps"
TRAIN_SKIPPED_STEPS: Final = "llm.train.skipped_steps"
"""counter, unit {step}: optimizer steps taken."""
TRAIN_TOKENS: Final = "llm.train.tokens"
"""counter, unit {token}: tokens processed (non-padding when a mask is known)."""
TRAIN_STEP_DURATION: Final = "llm.train.step.duration"
"""histogram, unit s: wall time between consecutive optimizer steps."""
TRAIN_LEARNING_RATE: Final = "llm.train.learning_rate"
"""observable gauge, no unit: lr of each optimizer param group."""
GRAD_NORM: Final = "llm.grad.norm"
"""observable gauge, no unit: global L2 gradient norm before clipping."""
GRAD_CLIPPED_STEPS: Final = "llm.grad.clipped_steps"
"""counter, unit {step}: optimizer steps whose clip call scaled the gradients down."""

# --- The 17 LLM signals ----------------------------------------------------

GRAD_NORM_DECAY_RATE: Final = "llm.grad.norm_decay_rate"
GRAD_SPARSITY: Final = "llm.grad.sparsity"
PARAM_UPDATE_RATIO: Final = "llm.param.update_ratio"
PARAM_UPDATE_VARIANCE_RATIO: Final = "llm.param.update_variance_ratio"
LOSS_TOKEN: Final = "llm.loss.token"
LOSS_TOKEN_SKEWNESS: Final = "llm.loss.token_skewness"
LOGITS_Z_LOSS: Final = "llm.logits.z_loss"
ATTENTION_HEAD_ENTROPY: Final = "llm.attention.head_entropy"
ATTENTION_HEAD_DIVERGENCE_MAX: Final = "llm.attention.head_divergence_max"
ATTENTION_LOGIT_MAX: Final = "llm.attention.logit_max"
ATTENTION_SINK_RATIO: Final = "llm.attention.sink_ratio"
ACTIVATION_SPARSITY: Final = "llm.activation.sparsity"
ACTIVATION_OUTLIER_RATIO: Final = "llm.activation.outlier_ratio"
LORA_RANK_ACTIVATION_RATIO: Final = "llm.lora.rank_activation_ratio"
ROPE_ANGLE_DEVIATION: Final = "llm.rope.angle_deviation"
KV_CACHE_HIT_RATIO: Final = "llm.kv_cache.hit_ratio"
KV_CACHE_HITS: Final = "llm.kv_cache.hits"
KV_CACHE_LOOKUPS: Final = "llm.kv_cache.lookups"
MEMORY_PRESSURE: Final = "llm.memory.pressure"

# --- Throughput and goodput ----------------------------------------------

TRAIN_FLOPS: Final = "llm.train.flops"
"""counter, unit {flop}: model FLOPs executed (forward + backward); rate() is the achieved FLOP/s."""
TRAIN_MFU: Final = "llm.train.mfu"
"""observable gauge, no unit: achieved FLOP/s over the device's peak FLOP/s (absent when the peak is unknown)."""
TRAIN_INPUT_WAIT: Final = "llm.train.input_wait.duration"
"""histogram, unit s: from the end of optimizer.step() to the next training forward, checkpoint saves excluded."""
TRAIN_COMPUTE: Final = "llm.train.compute.duration"
"""histogram, unit s: from a step's first training forward to the end of its optimizer.step()."""
TRAIN_CHECKPOINT: Final = "llm.train.checkpoint.duration"
"""histogram, unit s: one checkpoint save (torch.save, torch.distributed.checkpoint, save_pretrained, Trainer)."""
TRAIN_GOODPUT: Final = "llm.train.goodput"
"""observable gauge, no unit: compute time over wall time since the previous sampled step."""
TRAIN_LAST_STEP: Final = "llm.train.last_step.timestamp"
"""observable gauge, unit s: Unix time of the last completed optimizer step, every step (for "stalled" alerts)."""
TRAIN_STEP_SLOWEST: Final = "llm.train.step.slowest"
"""observable gauge, unit s: mean busy step time of the slowest data-parallel rank since the previous sampled step."""
TRAIN_STEP_FASTEST: Final = "llm.train.step.fastest"
"""observable gauge, unit s: mean step time of the fastest data-parallel rank since the previous sampled step."""
TRAIN_STEP_SKEW_RATIO: Final = "llm.train.step.skew_ratio"
"""observable gauge, unit 1: slowest / fastest rank step time - 1."""
MEMORY_PEAK_ALLOCATED: Final = "llm.memory.peak_allocated"
"""observable gauge, unit By: peak allocated bytes since the previous sampled step (CPU: peak RSS)."""
MEMORY_PEAK_RESERVED: Final = "llm.memory.peak_reserved"
"""observable gauge, unit By: peak bytes the CUDA caching allocator reserved since the previous sampled step."""

STALL_SECONDS: Final = 600.0
"""No optimizer step for this long fires the stalled-trainer alert."""
SKEW_LIMIT: Final = 0.2
"""The slowest rank taking this much longer per step than the fastest, for 10 minutes, warns."""

# --- Pipeline self-observability -------------------------------------------

TELEMETRY_SAMPLED_STEPS: Final = "llm.telemetry.sampled_steps"
TELEMETRY_SAMPLING_INTERVAL: Final = "llm.telemetry.sampling_interval"
TELEMETRY_OVERHEAD: Final = "llm.telemetry.overhead"
TELEMETRY_NONFINITE: Final = "llm.telemetry.nonfinite"
ANOMALY_EVENTS: Final = "llm.anomaly.events"
GUARD_ACTIONS: Final = "llm.guard.actions"
"""counter, unit {action}: times an enabled guard changed training."""

STEP_DURATION_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOSS_TOKEN_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
HEAD_ENTROPY_BUCKETS: Final = (0.25, 0.5, 0.75, 1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0)
OVERHEAD_BUCKETS: Final = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)
PHASE_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Input wait and compute: from a prefetched batch (~1 ms) to a minute-long step."""
CHECKPOINT_BUCKETS: Final = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""A checkpoint save: a small model's state dict to a sharded multi-terabyte save."""


def _gauge(name: str, description: str, *, family: str, unit: str, anomaly: AnomalyProfile | None,
           attributes: tuple[str, ...] = (), number: int | None = None,
           thresholds: tuple[Threshold, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "observable_gauge", unit, description, attributes,
                      thresholds=thresholds, signal_number=number, family=family, anomaly=anomaly)


CATALOG: Final[tuple[MetricSpec, ...]] = (
    _gauge(TRAIN_LOSS, "Mean training loss of the latest sampled step, as the loss function returned it.",
           unit=DIMENSIONLESS, family="loss", anomaly=_SCALE),
    MetricSpec(TRAIN_STEPS, "counter", "{step}", "Optimizer steps taken.", family="training"),
    MetricSpec(TRAIN_SKIPPED_STEPS, "counter", "{step}",
               "Updates the optimizer skipped (DeepSpeed's fp16 overflow, the skip_nonfinite guard): not counted in "
               "llm.train.steps.",
               family="training"),
    MetricSpec(TRAIN_TOKENS, "counter", "{token}",
               "Tokens processed (non-padding input tokens when an attention mask is known).", family="tokens"),
    MetricSpec(TRAIN_STEP_DURATION, "histogram", "s", "Wall time between consecutive optimizer steps.",
               buckets=STEP_DURATION_BUCKETS, family="training"),
    _gauge(TRAIN_LEARNING_RATE, "Learning rate of each optimizer param group.", attributes=(ATTR_PARAM_GROUP,),
           unit=DIMENSIONLESS, family="optimizer", anomaly=None),
    _gauge(GRAD_NORM, "Global L2 norm of all gradients before clipping: the norm the step's clip call computed "
           "(clip_grad_norm_ and the frameworks built on it), else the norm at optimizer pre-step; after AMP "
           "unscale.", unit=DIMENSIONLESS, family="optimizer", anomaly=_SCALE),
    MetricSpec(GRAD_CLIPPED_STEPS, "counter", "{step}",
               "Optimizer steps whose clip call scaled the gradients down (pre-clip norm > max norm).",
               family="optimizer"),
    _gauge(GRAD_NORM_DECAY_RATE,
           "(|g_{t-1}| - |g_t|) / (|g_{t-1}| + 1e-8) between consecutive optimizer steps.", number=1,
           thresholds=(Threshold("warning", ">", 0.85, "gradient collapse"),
                       Threshold("warning", "<", -0.1, "gradient rebound")),
           unit=DIMENSIONLESS, family="optimizer", anomaly=_SIGNED),
    _gauge(GRAD_SPARSITY, "Fraction of gradient elements with abs <= threshold (default 1e-5).",
           attributes=(ATTR_PARAM_GROUP,), number=2, unit=DIMENSIONLESS, family="optimizer", anomaly=_FRACTION),
    _gauge(PARAM_UPDATE_RATIO, "|delta theta|_2 / |theta_before|_2 over trainable parameters.", number=3,
           thresholds=(Threshold("warning", ">", 1e-2, "updates too large for the weights"),), unit=RATIO,
           family="optimizer", anomaly=_SCALE),
    _gauge(PARAM_UPDATE_VARIANCE_RATIO,
           "Sum over sampled coordinates of the cross-rank variance of the update, over the mean squared "
           "update norm; 0 with one rank.", number=4,
           thresholds=(Threshold("warning", ">=", 1e-5, "ranks drifting apart"),
                       Threshold("critical", ">=", 1e-3, "ranks out of sync")), unit=RATIO, family="optimizer",
           anomaly=_SCALE),
    MetricSpec(LOSS_TOKEN, "histogram", NATS,
               "Per-token cross-entropy (nats) of the sampled step, at most 512 tokens uniformly subsampled.",
               buckets=LOSS_TOKEN_BUCKETS, signal_number=5, family="loss"),
    _gauge(LOSS_TOKEN_SKEWNESS, "Fisher-Pearson skewness m3 / m2^1.5 of the step's valid per-token losses.",
           number=6, unit=DIMENSIONLESS, family="loss", anomaly=_SKEWNESS),
    _gauge(LOGITS_Z_LOSS, "Mean over valid tokens of (logsumexp of the logits)^2 (PaLM z-loss, no coefficient).",
           number=7, unit=DIMENSIONLESS, family="loss", anomaly=_SCALE),
    MetricSpec(ATTENTION_HEAD_ENTROPY, "histogram", NATS,
               "Per-head Shannon entropy (nats) of attention, averaged over sampled queries.",
               attributes=(ATTR_LAYER,), buckets=HEAD_ENTROPY_BUCKETS, signal_number=8,
               thresholds=(Threshold("warning", ">", 1.8, "attention diffusing", statistic="p50 per layer",
                                     for_duration="3m"),), family="attention"),
    _gauge(ATTENTION_HEAD_DIVERGENCE_MAX, "Max over heads of the variance of the head's cosine similarity "
           "to the other heads' attention outputs.", attributes=(ATTR_LAYER,), number=9, unit=DIMENSIONLESS,
           family="attention", anomaly=_SCALE),
    _gauge(ATTENTION_LOGIT_MAX, "Max pre-softmax attention logit q.k.scale.", attributes=(ATTR_LAYER,), number=10,
           unit=DIMENSIONLESS, family="attention", anomaly=_SCALE),
    _gauge(ATTENTION_SINK_RATIO, "Mean attention probability on key position 0 for query positions > 0.",
           attributes=(ATTR_LAYER,), number=11, unit=RATIO, family="attention", anomaly=_FRACTION),
    _gauge(ACTIVATION_SPARSITY, "Fraction of MLP intermediate activations with abs <= 1e-3.",
           attributes=(ATTR_LAYER,), number=12, unit=DIMENSIONLESS, family="activations", anomaly=_FRACTION),
    _gauge(ACTIVATION_OUTLIER_RATIO, "Fraction of hidden dimensions whose max abs over the step's tokens is >= 6.0.",
           attributes=(ATTR_LAYER,), number=13, unit=RATIO, family="activations", anomaly=_FRACTION),
    _gauge(LORA_RANK_ACTIVATION_RATIO, "Effective rank of lora_A activations over the LoRA rank.",
           attributes=(ATTR_LAYER,), number=14,
           thresholds=(Threshold("warning", ">", 0.9, "LoRA rank saturated"),), unit=RATIO, family="lora",
           anomaly=_FRACTION),
    _gauge(ROPE_ANGLE_DEVIATION, "Max abs error of the rotary angles the module emitted vs exact float64 angles.",
           unit="rad", number=15, family="rope", anomaly=_ROPE),
    _gauge(KV_CACHE_HIT_RATIO, "Reused / (reused + newly computed) K/V entries over the last 64 cache updates.",
           number=16, thresholds=(Threshold("warning", "<", 0.6, "KV cache reuse is low"),), unit=RATIO,
           family="kv_cache", anomaly=None),
    MetricSpec(KV_CACHE_HITS, "counter", "{token}", "K/V token entries served from the cache.", family="kv_cache"),
    MetricSpec(KV_CACHE_LOOKUPS, "counter", "{token}", "K/V token entries attended (reused + newly computed).",
               family="kv_cache"),
    _gauge(MEMORY_PRESSURE, "CUDA: (total - free) / total; CPU: process RSS / physical memory.",
           attributes=(ATTR_DEVICE,), number=17,
           thresholds=(Threshold("warning", ">", 0.85, "memory pressure high"),
                       Threshold("critical", ">", 0.95, "memory nearly exhausted")),
           unit=DIMENSIONLESS, family="memory", anomaly=None),
    MetricSpec(TRAIN_FLOPS, "counter", "{flop}",
               "Model FLOPs executed, forward + backward (matmul and attention FLOPs as torch's FlopCounterMode "
               "counts them, once per input shape; `analytic`: 6 x non-embedding parameters x tokens + attention "
               "12 x layers x sequence x hidden x tokens when counting is impossible).",
               attributes=(ATTR_FLOPS_METHOD,), family="flops"),
    _gauge(TRAIN_MFU, "Model FLOPs utilisation since the previous sampled step: achieved FLOP/s over the device's "
           "peak FLOP/s (table by device and dtype, or OTEL_LLM_PEAK_FLOPS); absent when the peak is unknown.",
           unit=DIMENSIONLESS, family="flops", anomaly=None),
    MetricSpec(TRAIN_INPUT_WAIT, "histogram", "s",
               "Per step: from the end of optimizer.step() to the next training forward (waiting for the batch), "
               "checkpoint saves excluded.", buckets=PHASE_BUCKETS, family="step_time"),
    MetricSpec(TRAIN_COMPUTE, "histogram", "s",
               "Per step: from its first training forward to the end of optimizer.step() (forward, backward, "
               "optimizer), host time.", buckets=PHASE_BUCKETS, family="step_time"),
    MetricSpec(TRAIN_CHECKPOINT, "histogram", "s",
               "One checkpoint save (torch.save, torch.distributed.checkpoint save/async_save, save_pretrained, "
               "Trainer checkpoints), outermost call only.", buckets=CHECKPOINT_BUCKETS, family="step_time"),
    _gauge(TRAIN_GOODPUT, "Compute time over wall time since the previous sampled step (1: no time lost to input "
           "or checkpoints).", unit=DIMENSIONLESS, family="step_time", anomaly=None),
    _gauge(TRAIN_LAST_STEP, "Unix time of the last completed optimizer step (updated every step).", unit="s",
           thresholds=(Threshold("critical", ">", STALL_SECONDS, "no optimizer step for 10 minutes",
                                 statistic="age"),), family="step_time", anomaly=None),
    _gauge(TRAIN_STEP_SLOWEST, "Mean step time (input wait + compute + saves) of the slowest data-parallel rank "
           "since the previous sampled step (agreed in the sampling collective; adaptive sampling only; exported "
           "by rank 0).", unit="s",
           family="step_time", anomaly=None),
    _gauge(TRAIN_STEP_FASTEST, "Mean step time of the fastest data-parallel rank since the previous sampled step.",
           unit="s", family="step_time", anomaly=None),
    _gauge(TRAIN_STEP_SKEW_RATIO, "Slowest over fastest rank step time, minus 1 (0: all ranks equally fast).",
           thresholds=(Threshold("warning", ">", SKEW_LIMIT, "one rank is slower than the others",
                                 for_duration="10m"),), unit=RATIO, family="step_time", anomaly=None),
    _gauge(MEMORY_PEAK_ALLOCATED, "Peak allocated bytes since the previous sampled step: "
           "torch.cuda.max_memory_allocated (then reset); CPU: peak RSS (VmHWM, then reset).",
           attributes=(ATTR_DEVICE,), unit=BYTES, family="peak_memory", anomaly=None),
    _gauge(MEMORY_PEAK_RESERVED, "Peak bytes reserved by the CUDA caching allocator since the previous sampled step "
           "(torch.cuda.max_memory_reserved, then reset); CUDA only.", attributes=(ATTR_DEVICE,), unit=BYTES,
           family="peak_memory", anomaly=None),
    MetricSpec(TELEMETRY_SAMPLED_STEPS, "counter", "{step}", "Steps on which the expensive signals were computed.",
               family="telemetry"),
    _gauge(TELEMETRY_SAMPLING_INTERVAL, "Current sampling interval.", unit="{step}", family="telemetry", anomaly=None),
    MetricSpec(TELEMETRY_OVERHEAD, "histogram", "s",
               "Host time otel_llm took on the training thread in a sampled step (hooks, interceptors, publishing).",
               buckets=OVERHEAD_BUCKETS, family="telemetry"),
    MetricSpec(TELEMETRY_NONFINITE, "counter", "{event}",
               "Sampled steps on which a signal came out NaN or Inf (one event per signal per step); those values "
               "are dropped.",
               attributes=(ATTR_SIGNAL,),
               thresholds=(Threshold("warning", "increase", 0.0, "a signal went NaN/Inf"),), family="telemetry"),
    MetricSpec(ANOMALY_EVENTS, "counter", "{event}",
               "Anomalies the detector flagged (one per series and event; each is also an OTel log record).",
               attributes=(ATTR_SIGNAL,),
               thresholds=(Threshold("warning", "increase", 0.0, "the anomaly detector flagged a signal"),),
               family="telemetry"),
    MetricSpec(GUARD_ACTIONS, "counter", "{action}",
               "Times an enabled guard changed training: an update skipped (skip_nonfinite), the learning rate "
               "lowered (lr_backoff), clipping turned on (clip_on_rebound); each is also a log line and record.",
               attributes=(ATTR_GUARD_ACTION,),
               thresholds=(Threshold("warning", "increase", 0.0, "a guard changed training"),), family="guards"),
)

_BY_NAME: Final = {spec.name: spec for spec in CATALOG}


def by_name(name: str) -> MetricSpec:
    """The catalog entry for ``name``; KeyError when it is not a built-in signal."""
    return _BY_NAME[name]


def family_signals(family: str) -> tuple[str, ...]:
    """Names of the catalog signals of ``family`` (a probe's name), in catalog order."""
    return tuple(spec.name for spec in CATALOG if spec.family == family)
