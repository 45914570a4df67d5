"""The model probes a session runs, chosen from the configuration."""

from __future__ import annotations

from otel_llm.config import Config
from otel_llm.probes.base import ModelProbe

__all__ = ["build_model_probes"]


def build_model_probes(config: Config) -> list[ModelProbe]:
    """One probe per signal family that is not entirely disabled."""
    probes: list[ModelProbe] = []
    return probes
