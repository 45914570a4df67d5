"""Environment variables otel_llm reads, one documented constant each.

Explicit :class:`otel_llm.Config` fields win over these; these win over the
defaults. A malformed value is logged and replaced by the default so a typo in
a job spec never stops training.
"""

from typing import Final

__all__ = [
    "OTEL_LLM_ACTIVATION_OUTLIER_THRESHOLD",
    "OTEL_LLM_ACTIVATION_SPARSITY_THRESHOLD",
    "OTEL_LLM_ATTENTION_QUERIES",
    "OTEL_LLM_DISABLED_SIGNALS",
    "OTEL_LLM_EXPORT_RANKS",
    "OTEL_LLM_GRAD_SPARSITY_THRESHOLD",
    "OTEL_LLM_LAYERS_PATH",
    "OTEL_LLM_MLP_OUTPUT_PATH",
    "OTEL_LLM_SAMPLING",
    "OTEL_LLM_SAMPLING_INTERVAL",
    "OTEL_LLM_SCHEMA",
    "OTEL_LLM_SHUTDOWN_TIMEOUT",
    "OTEL_LLM_TOKEN_LOSS_SAMPLES",
    "OTEL_LLM_UPDATE_SAMPLE_SEED",
    "OTEL_LLM_UPDATE_SAMPLE_SIZE",
]

OTEL_LLM_SAMPLING_INTERVAL: Final = "OTEL_LLM_SAMPLING_INTERVAL"
"""Compute the expensive signals every N optimizer steps (integer >= 1, default 10)."""

OTEL_LLM_SAMPLING: Final = "OTEL_LLM_SAMPLING"
"""Sampling policy: ``fixed`` (default) or ``adaptive`` (currently the fixed schedule)."""

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
