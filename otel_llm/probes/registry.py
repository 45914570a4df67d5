"""The model probes a session runs, chosen from the configuration."""

from __future__ import annotations

from otel_llm.catalog import GRAD_SPARSITY, LORA_RANK_ACTIVATION_RATIO, ROPE_ANGLE_DEVIATION
from otel_llm.config import Config
from otel_llm.probes.activations import ACTIVATION_SIGNALS, ActivationProbe
from otel_llm.probes.attention import ATTENTION_SIGNALS, AttentionProbe
from otel_llm.probes.base import ModelProbe
from otel_llm.probes.lora import LoraProbe
from otel_llm.probes.rope import RopeProbe

__all__ = ["build_model_probes"]


def build_model_probes(config: Config) -> list[ModelProbe]:
    """One probe per signal family that is not entirely disabled."""
    probes: list[ModelProbe] = []
    if not all(config.is_disabled(name) for name in ATTENTION_SIGNALS):
        probes.append(AttentionProbe(config))
    if not config.is_disabled(ROPE_ANGLE_DEVIATION):
        probes.append(RopeProbe(config))
    if not all(config.is_disabled(name) for name in ACTIVATION_SIGNALS):
        probes.append(ActivationProbe(config))
    if not all(config.is_disabled(name) for name in (LORA_RANK_ACTIVATION_RATIO, GRAD_SPARSITY)):
        probes.append(LoraProbe(config))
    return probes
