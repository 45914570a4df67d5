"""What to check first when an otel_llm alert fires, by alert name (the ``runbook`` annotation)."""

from __future__ import annotations

from typing import Final

__all__ = ["RUNBOOKS"]

RUNBOOKS: Final[dict[str, str]] = {
    "LlmGradNormDecayRateHigh": (
        "The gradient norm keeps falling by more than 85% between consecutive steps: look for vanishing "
        "gradients (loss plateau, learning rate decayed to ~0, dead activations); compare llm_grad_norm with "
        "llm_train_learning_rate."),
    "LlmGradNormDecayRateLow": (
        "The gradient norm keeps growing by more than 10% per step, often the start of a loss spike: check "
        "llm_train_loss, llm_logits_z_loss and the warmup; consider gradient clipping or a lower learning rate."),
    "LlmParamUpdateRatioHigh": (
        "Each step moves the weights by more than 1% (healthy is about 1e-3): lower the learning rate or "
        "lengthen warmup; check llm_grad_norm for spikes."),
    "LlmParamUpdateVarianceRatioHigh": (
        "Data-parallel ranks applied different updates: check that gradients are all-reduced (DDP/FSDP "
        "wrapping, no_sync use), seeds and optimizer state; at critical the replicas have diverged, so stop "
        "and resume from the last checkpoint."),
    "LlmAttentionHeadEntropyHigh": (
        "Attention in this layer spreads almost uniformly over the keys: look for a broken mask or positional "
        "encoding, or collapse after a learning-rate change; compare llm_attention_logit_max and "
        "llm_attention_sink_ratio of the layer."),
    "LlmLoraRankActivationRatioHigh": (
        "The LoRA adapters of this layer use nearly all of their rank: raise the rank r for these modules or "
        "accept the capacity limit."),
    "LlmKvCacheHitRatioLow": (
        "Fewer than 60% of K/V entries come from the cache: check prefix caching, cache size and eviction, and "
        "request batching; compare rate(llm_kv_cache_hits_total) / rate(llm_kv_cache_lookups_total)."),
    "LlmMemoryPressureHigh": (
        "Device memory is nearly full: reduce the micro-batch size or sequence length, enable activation "
        "checkpointing, or look for a leak if pressure grows with the step count; at critical an OOM is "
        "imminent."),
    "LlmTrainLastStepStale": (
        "No optimizer step completed for 10 minutes while the process still serves metrics: the trainer is stuck "
        "(a hung collective on some rank, a dead DataLoader worker, a deadlock) or in a long evaluation or "
        "checkpoint; compare llm_train_last_step_timestamp_seconds across ranks (the rank that stopped first is "
        "the suspect), then py-spy dump the processes."),
    "LlmTrainStepSkewRatioHigh": (
        "The slowest data-parallel rank has taken over 20% longer per step than the fastest for 10 minutes, and "
        "every rank waits for it at each all-reduce: find it in llm_train_step_duration_seconds by rank, then "
        "check that host (thermal throttling, a noisy neighbour, a slow disk or input pipeline: "
        "llm_train_input_wait_duration_seconds)."),
    "LlmTelemetryNonfiniteIncreasing": (
        "The signal in llm_signal came out NaN/Inf and was counted instead of exported: for llm.train.loss or "
        "llm.grad.norm the run has likely diverged; check the learning rate, AMP loss scaling and the data "
        "around that step, and resume from the last good checkpoint."),
    "LlmAnomalyEventsIncreasing": (
        "The detector saw the signal in llm_signal jump or shift far beyond how it moved so far (or go NaN/Inf): "
        "find the step in the anomaly log records (event llm.anomaly: signal, layer, step, score); a flag on "
        "llm.param.update_ratio or llm.grad.norm points at the learning rate or a bad batch, on llm.train.loss "
        "alone at the data or labels, on the activation or attention signals of one layer at that layer's "
        "weights. Compare with llm_train_loss and resume from the last good checkpoint if the loss does not "
        "recover."),
    "LlmGuardActionsIncreasing": (
        "A guard (llm_guard_action) changed training: skip_nonfinite skipped an update with NaN/Inf gradients, "
        "lr_backoff lowered the learning rate after the gradient norm kept collapsing, clip_on_rebound turned "
        "on clipping after it kept growing. The log line and record (event llm.guard) give the step and the "
        "values; repeated actions mean the cause persists: check the data, the learning rate and the warmup."),
}
