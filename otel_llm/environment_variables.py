"""Environment variables otel_llm itself reads, one ``Final`` constant each.

Each names the :class:`otel_llm.Config` field it sets; that field's metadata
holds the default and the help text (``otel-llm docs config`` renders them), so
they are written once. The standard OpenTelemetry variables otel_llm reads come
from the SDK's own constants.
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
    "OTEL_LLM_GUARDS",
    "OTEL_LLM_GUARD_CLIP_MAX_NORM",
    "OTEL_LLM_GUARD_CLIP_PATIENCE",
    "OTEL_LLM_GUARD_CLIP_STEPS",
    "OTEL_LLM_GUARD_CLIP_THRESHOLD",
    "OTEL_LLM_GUARD_LR_BACKOFF_COOLDOWN",
    "OTEL_LLM_GUARD_LR_BACKOFF_FACTOR",
    "OTEL_LLM_GUARD_LR_BACKOFF_FLOOR",
    "OTEL_LLM_GUARD_LR_BACKOFF_PATIENCE",
    "OTEL_LLM_GUARD_LR_BACKOFF_THRESHOLD",
    "OTEL_LLM_LAYERS_PATH",
    "OTEL_LLM_MLP_OUTPUT_PATH",
    "OTEL_LLM_PEAK_FLOPS",
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
    "OTEL_LLM_STEP_MEMORY_FLOOR_MIB",
    "OTEL_LLM_STEP_MEMORY_FRACTION",
    "OTEL_LLM_TOKEN_LOSS_SAMPLES",
    "OTEL_LLM_UPDATE_SAMPLE_SEED",
    "OTEL_LLM_UPDATE_SAMPLE_SIZE",
]

OTEL_LLM_SAMPLING: Final = "OTEL_LLM_SAMPLING"
"""Sets :attr:`otel_llm.Config.sampling`."""

OTEL_LLM_SAMPLING_INTERVAL: Final = "OTEL_LLM_SAMPLING_INTERVAL"
"""Sets :attr:`otel_llm.Config.sampling_interval`."""

OTEL_LLM_SAMPLING_WARMUP: Final = "OTEL_LLM_SAMPLING_WARMUP"
"""Sets :attr:`otel_llm.Config.sampling_warmup`."""

OTEL_LLM_SAMPLING_MIN_INTERVAL: Final = "OTEL_LLM_SAMPLING_MIN_INTERVAL"
"""Sets :attr:`otel_llm.Config.sampling_min_interval`."""

OTEL_LLM_SAMPLING_MAX_INTERVAL: Final = "OTEL_LLM_SAMPLING_MAX_INTERVAL"
"""Sets :attr:`otel_llm.Config.sampling_max_interval`."""

OTEL_LLM_SAMPLING_GROWTH_STEPS: Final = "OTEL_LLM_SAMPLING_GROWTH_STEPS"
"""Sets :attr:`otel_llm.Config.sampling_growth_steps`."""

OTEL_LLM_SAMPLING_LOSS_WINDOW: Final = "OTEL_LLM_SAMPLING_LOSS_WINDOW"
"""Sets :attr:`otel_llm.Config.sampling_loss_window`."""

OTEL_LLM_SAMPLING_SPIKE_SIGMA: Final = "OTEL_LLM_SAMPLING_SPIKE_SIGMA"
"""Sets :attr:`otel_llm.Config.sampling_spike_sigma`."""

OTEL_LLM_SAMPLING_PLATEAU_TOLERANCE: Final = "OTEL_LLM_SAMPLING_PLATEAU_TOLERANCE"
"""Sets :attr:`otel_llm.Config.sampling_plateau_tolerance`."""

OTEL_LLM_SAMPLING_MEMORY_LIMIT: Final = "OTEL_LLM_SAMPLING_MEMORY_LIMIT"
"""Sets :attr:`otel_llm.Config.sampling_memory_limit`."""

OTEL_LLM_ANOMALY_DETECTION: Final = "OTEL_LLM_ANOMALY_DETECTION"
"""Sets :attr:`otel_llm.Config.anomaly_detection`."""

OTEL_LLM_ANOMALY_BASELINE: Final = "OTEL_LLM_ANOMALY_BASELINE"
"""Sets :attr:`otel_llm.Config.anomaly_baseline`."""

OTEL_LLM_ANOMALY_WINDOW: Final = "OTEL_LLM_ANOMALY_WINDOW"
"""Sets :attr:`otel_llm.Config.anomaly_window`."""

OTEL_LLM_ANOMALY_SEGMENTS: Final = "OTEL_LLM_ANOMALY_SEGMENTS"
"""Sets :attr:`otel_llm.Config.anomaly_segments`."""

OTEL_LLM_ANOMALY_ALPHABET: Final = "OTEL_LLM_ANOMALY_ALPHABET"
"""Sets :attr:`otel_llm.Config.anomaly_alphabet`."""

OTEL_LLM_ANOMALY_THRESHOLD: Final = "OTEL_LLM_ANOMALY_THRESHOLD"
"""Sets :attr:`otel_llm.Config.anomaly_threshold`."""

OTEL_LLM_DISABLED_SIGNALS: Final = "OTEL_LLM_DISABLED_SIGNALS"
"""Sets :attr:`otel_llm.Config.disabled_signals`."""

OTEL_LLM_SCHEMA: Final = "OTEL_LLM_SCHEMA"
"""Sets :attr:`otel_llm.Config.schema_path`."""

OTEL_LLM_GRAD_SPARSITY_THRESHOLD: Final = "OTEL_LLM_GRAD_SPARSITY_THRESHOLD"
"""Sets :attr:`otel_llm.Config.grad_sparsity_threshold`."""

OTEL_LLM_TOKEN_LOSS_SAMPLES: Final = "OTEL_LLM_TOKEN_LOSS_SAMPLES"
"""Sets :attr:`otel_llm.Config.token_loss_samples`."""

OTEL_LLM_UPDATE_SAMPLE_SIZE: Final = "OTEL_LLM_UPDATE_SAMPLE_SIZE"
"""Sets :attr:`otel_llm.Config.update_sample_size`."""

OTEL_LLM_UPDATE_SAMPLE_SEED: Final = "OTEL_LLM_UPDATE_SAMPLE_SEED"
"""Sets :attr:`otel_llm.Config.update_sample_seed`."""

OTEL_LLM_STEP_MEMORY_FRACTION: Final = "OTEL_LLM_STEP_MEMORY_FRACTION"
"""Sets :attr:`otel_llm.Config.step_memory_fraction`."""

OTEL_LLM_STEP_MEMORY_FLOOR_MIB: Final = "OTEL_LLM_STEP_MEMORY_FLOOR_MIB"
"""Sets :attr:`otel_llm.Config.step_memory_floor_mib`."""

OTEL_LLM_ATTENTION_QUERIES: Final = "OTEL_LLM_ATTENTION_QUERIES"
"""Sets :attr:`otel_llm.Config.attention_queries`."""

OTEL_LLM_LAYERS_PATH: Final = "OTEL_LLM_LAYERS_PATH"
"""Sets :attr:`otel_llm.Config.layers_path`."""

OTEL_LLM_MLP_OUTPUT_PATH: Final = "OTEL_LLM_MLP_OUTPUT_PATH"
"""Sets :attr:`otel_llm.Config.mlp_output_path`."""

OTEL_LLM_PEAK_FLOPS: Final = "OTEL_LLM_PEAK_FLOPS"
"""Sets :attr:`otel_llm.Config.peak_flops`."""

OTEL_LLM_ACTIVATION_SPARSITY_THRESHOLD: Final = "OTEL_LLM_ACTIVATION_SPARSITY_THRESHOLD"
"""Sets :attr:`otel_llm.Config.activation_sparsity_threshold`."""

OTEL_LLM_ACTIVATION_OUTLIER_THRESHOLD: Final = "OTEL_LLM_ACTIVATION_OUTLIER_THRESHOLD"
"""Sets :attr:`otel_llm.Config.activation_outlier_threshold`."""

OTEL_LLM_SHUTDOWN_TIMEOUT: Final = "OTEL_LLM_SHUTDOWN_TIMEOUT"
"""Sets :attr:`otel_llm.Config.shutdown_timeout`."""

OTEL_LLM_EXPORT_RANKS: Final = "OTEL_LLM_EXPORT_RANKS"
"""Sets :attr:`otel_llm.Config.export_ranks`."""

OTEL_LLM_GUARDS: Final = "OTEL_LLM_GUARDS"
"""Sets :attr:`otel_llm.Config.guards`."""

OTEL_LLM_GUARD_LR_BACKOFF_THRESHOLD: Final = "OTEL_LLM_GUARD_LR_BACKOFF_THRESHOLD"
"""Sets :attr:`otel_llm.Config.guard_lr_backoff_threshold`."""

OTEL_LLM_GUARD_LR_BACKOFF_PATIENCE: Final = "OTEL_LLM_GUARD_LR_BACKOFF_PATIENCE"
"""Sets :attr:`otel_llm.Config.guard_lr_backoff_patience`."""

OTEL_LLM_GUARD_LR_BACKOFF_FACTOR: Final = "OTEL_LLM_GUARD_LR_BACKOFF_FACTOR"
"""Sets :attr:`otel_llm.Config.guard_lr_backoff_factor`."""

OTEL_LLM_GUARD_LR_BACKOFF_COOLDOWN: Final = "OTEL_LLM_GUARD_LR_BACKOFF_COOLDOWN"
"""Sets :attr:`otel_llm.Config.guard_lr_backoff_cooldown`."""

OTEL_LLM_GUARD_LR_BACKOFF_FLOOR: Final = "OTEL_LLM_GUARD_LR_BACKOFF_FLOOR"
"""Sets :attr:`otel_llm.Config.guard_lr_backoff_floor`."""

OTEL_LLM_GUARD_CLIP_THRESHOLD: Final = "OTEL_LLM_GUARD_CLIP_THRESHOLD"
"""Sets :attr:`otel_llm.Config.guard_clip_threshold`."""

OTEL_LLM_GUARD_CLIP_PATIENCE: Final = "OTEL_LLM_GUARD_CLIP_PATIENCE"
"""Sets :attr:`otel_llm.Config.guard_clip_patience`."""

OTEL_LLM_GUARD_CLIP_STEPS: Final = "OTEL_LLM_GUARD_CLIP_STEPS"
"""Sets :attr:`otel_llm.Config.guard_clip_steps`."""

OTEL_LLM_GUARD_CLIP_MAX_NORM: Final = "OTEL_LLM_GUARD_CLIP_MAX_NORM"
"""Sets :attr:`otel_llm.Config.guard_clip_max_norm`."""
