"""Environment variables otel_llm reads, one documented constant each.

Explicit :class:`otel_llm.Config` fields win over these; these win over the
defaults. A malformed value is logged and replaced by the default so a typo in
a job spec never stops training.
"""

from typing import Final

__all__ = [
    "OTEL_LLM_ACTIVATION_OUTLIER_THRESHOLD",
    "OTEL_LLM_ACTIVATION_SPARSITY_THRESHOLD",
    "OTEL_LLM_ANOMALY_ALPHABET",
    "OTEL_LLM_ANOMALY_BASELINE",
    "OTEL_LLM_ANOMALY_DETECTION",
    "OTEL_LLM_ANOMALY_SEGMENTS",
    "OTEL_LLM_ANOMALY_THRESHOLD",
    "OTEL_LLM_ANOMALY_WINDOW",
    "OTEL_LLM_ATTENTION_QUERIES",
    "OTEL_LLM_DISABLED_SIGNALS",
    "OTEL_LLM_EXPORT_RANKS",
    "OTEL_LLM_GRAD_SPARSITY_THRESHOLD",
    "OTEL_LLM_LAYERS_PATH",
    "OTEL_LLM_MLP_OUTPUT_PATH",
    "OTEL_LLM_SAMPLING",
    "OTEL_LLM_SAMPLING_GROWTH_STEPS",
    "OTEL_LLM_SAMPLING_INTERVAL",
    "OTEL_LLM_SAMPLING_LOSS_WINDOW",
    "OTEL_LLM_SAMPLING_MAX_INTERVAL",
    "OTEL_LLM_SAMPLING_MEMORY_LIMIT",
    "OTEL_LLM_SAMPLING_MIN_INTERVAL",
    "OTEL_LLM_SAMPLING_PLATEAU_TOLERANCE",
    "OTEL_LLM_SAMPLING_SPIKE_SIGMA",
    "OTEL_LLM_SAMPLING_WARMUP",
    "OTEL_LLM_SCHEMA",
    "OTEL_LLM_SHUTDOWN_TIMEOUT",
    "OTEL_LLM_TOKEN_LOSS_SAMPLES",
    "OTEL_LLM_UPDATE_SAMPLE_SEED",
    "OTEL_LLM_UPDATE_SAMPLE_SIZE",
]

OTEL_LLM_SAMPLING_INTERVAL: Final = "OTEL_LLM_SAMPLING_INTERVAL"
"""Fixed sampling: compute the expensive signals every N optimizer steps (integer >= 1, default 10)."""

OTEL_LLM_SAMPLING: Final = "OTEL_LLM_SAMPLING"
"""Sampling policy: ``adaptive`` (default) or ``fixed`` (every ``OTEL_LLM_SAMPLING_INTERVAL`` steps)."""

OTEL_LLM_DISABLED_SIGNALS: Final = "OTEL_LLM_DISABLED_SIGNALS"
"""Comma-separated catalog names (``fnmatch`` patterns allowed) to neither compute nor export."""

OTEL_LLM_SCHEMA: Final = "OTEL_LLM_SCHEMA"
"""Path of a YAML file declaring extra user metrics (see README, "Custom metrics")."""

OTEL_LLM_GRAD_SPARSITY_THRESHOLD: Final = "OTEL_LLM_GRAD_SPARSITY_THRESHOLD"
"""abs(grad) at or below this counts as zero for ``llm.grad.sparsity`` (default 1e-5)."""

OTEL_LLM_TOKEN_LOSS_SAMPLES: Final = "OTEL_LLM_TOKEN_LOSS_SAMPLES"
"""Most per-token losses recorded into ``llm.loss.token`` per sampled step (1..512, default 512)."""

OTEL_LLM_UPDATE_SAMPLE_SIZE: Final = "OTEL_LLM_UPDATE_SAMPLE_SIZE"
"""Coordinates in the shared sample used by ``llm.param.update_variance_ratio`` (default 65536)."""

OTEL_LLM_UPDATE_SAMPLE_SEED: Final = "OTEL_LLM_UPDATE_SAMPLE_SEED"
"""Seed of that coordinate sample; must be equal on every rank (default 0)."""

OTEL_LLM_SHUTDOWN_TIMEOUT: Final = "OTEL_LLM_SHUTDOWN_TIMEOUT"
"""Upper bound in seconds on ``shutdown()``/flush, whatever the collector does (default 2)."""

OTEL_LLM_ATTENTION_QUERIES: Final = "OTEL_LLM_ATTENTION_QUERIES"
"""Query positions per attention call sampled for the attention signals, last one included (default 64)."""

OTEL_LLM_LAYERS_PATH: Final = "OTEL_LLM_LAYERS_PATH"
"""Dotted path of the model's decoder layer ModuleList (e.g. ``model.layers``) when automatic discovery is wrong."""

OTEL_LLM_MLP_OUTPUT_PATH: Final = "OTEL_LLM_MLP_OUTPUT_PATH"
"""Path of the MLP output projection inside each decoder layer (e.g. ``mlp.w2``) for models not recognised."""

OTEL_LLM_ACTIVATION_SPARSITY_THRESHOLD: Final = "OTEL_LLM_ACTIVATION_SPARSITY_THRESHOLD"
"""abs(activation) at or below this counts as zero for ``llm.activation.sparsity`` (default 1e-3)."""

OTEL_LLM_ACTIVATION_OUTLIER_THRESHOLD: Final = "OTEL_LLM_ACTIVATION_OUTLIER_THRESHOLD"
"""Max abs at or above which a hidden dimension is an outlier for ``llm.activation.outlier_ratio`` (default 6.0)."""

OTEL_LLM_EXPORT_RANKS: Final = "OTEL_LLM_EXPORT_RANKS"
"""Which data-parallel ranks export: ``all`` (default) or ``zero`` (rank 0 only)."""

OTEL_LLM_SAMPLING_WARMUP: Final = "OTEL_LLM_SAMPLING_WARMUP"
"""Adaptive sampling: steps sampled one by one at the start of training (default 100)."""

OTEL_LLM_SAMPLING_MIN_INTERVAL: Final = "OTEL_LLM_SAMPLING_MIN_INTERVAL"
"""Adaptive sampling: interval after warm-up and after any loss spike, non-finite value or anomaly (default 10)."""

OTEL_LLM_SAMPLING_MAX_INTERVAL: Final = "OTEL_LLM_SAMPLING_MAX_INTERVAL"
"""Adaptive sampling: the interval never grows past this (default 100)."""

OTEL_LLM_SAMPLING_GROWTH_STEPS: Final = "OTEL_LLM_SAMPLING_GROWTH_STEPS"
"""Adaptive sampling: quiet steps after which the interval doubles (default 1000)."""

OTEL_LLM_SAMPLING_LOSS_WINDOW: Final = "OTEL_LLM_SAMPLING_LOSS_WINDOW"
"""Adaptive sampling: sampled losses behind the spike and plateau tests (default 20)."""

OTEL_LLM_SAMPLING_SPIKE_SIGMA: Final = "OTEL_LLM_SAMPLING_SPIKE_SIGMA"
"""Adaptive sampling: a loss this many standard deviations above the window mean is a spike (default 4)."""

OTEL_LLM_SAMPLING_PLATEAU_TOLERANCE: Final = "OTEL_LLM_SAMPLING_PLATEAU_TOLERANCE"
"""Adaptive sampling: a window whose std is below this fraction of its mean is a plateau (default 0.01)."""

OTEL_LLM_SAMPLING_MEMORY_LIMIT: Final = "OTEL_LLM_SAMPLING_MEMORY_LIMIT"
"""Adaptive sampling: memory pressure above which the interval doubles (default 0.85)."""

OTEL_LLM_ANOMALY_DETECTION: Final = "OTEL_LLM_ANOMALY_DETECTION"
"""SAX anomaly detection on the gauge signals: ``true`` (default) or ``false``."""

OTEL_LLM_ANOMALY_BASELINE: Final = "OTEL_LLM_ANOMALY_BASELINE"
"""Anomaly detection: sampled values in each signal's baseline (default 64)."""

OTEL_LLM_ANOMALY_WINDOW: Final = "OTEL_LLM_ANOMALY_WINDOW"
"""Anomaly detection: sampled values in the recent window compared with the baseline (default 8)."""

OTEL_LLM_ANOMALY_SEGMENTS: Final = "OTEL_LLM_ANOMALY_SEGMENTS"
"""Anomaly detection: PAA segments per window; must divide the window (default 4)."""

OTEL_LLM_ANOMALY_ALPHABET: Final = "OTEL_LLM_ANOMALY_ALPHABET"
"""Anomaly detection: SAX alphabet size, Gaussian breakpoints (default 8)."""

OTEL_LLM_ANOMALY_THRESHOLD: Final = "OTEL_LLM_ANOMALY_THRESHOLD"
"""Anomaly detection: MINDIST score above which a signal is flagged (default 6.5)."""
