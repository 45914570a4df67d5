"""RoPE probe: signal #15, the numerical error of the rotary angles a model emits.

transformers' rotary embedding modules (Llama, Qwen2, Mistral, ... and their
scaled variants: linear, dynamic, llama3, yarn) hold an ``inv_freq`` buffer and
return ``(cos, sin)`` from ``forward(x, position_ids)``. The emitted angle is
``atan2(sin, cos)`` (independent of yarn's positive ``attention_scaling``); the
exact angle is ``position_ids * inv_freq`` in float64 from the module's own
buffer, read after the forward so dynamic rescaling is seen. The deviation is
the max wrapped difference, computed on the device on sampled steps only.
Low-precision cos/sin at long positions (bfloat16 at positions in the
thousands) is what it catches.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, cast

import torch

from otel_llm.catalog import ROPE_ANGLE_DEVIATION
from otel_llm.config import Config
from otel_llm.probes._measuring import measuring
from otel_llm.probes.base import Probe, StepValues
from otel_llm.runtime.log_once import LogOnce

__all__ = ["RopeProbe", "angle_deviation", "rotary_modules"]

_logger = logging.getLogger(__name__)


def rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules owning an ``inv_freq`` tensor: transformers' rotary embeddings."""
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def angle_deviation(cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
                    inv_freq: torch.Tensor) -> torch.Tensor:
    """Max |wrap(atan2(sin, cos) - position_ids * inv_freq)| as a 0-d float64 tensor.

    cos/sin's last dimension is either one angle per frequency or, as in
    transformers' ``rotate_half`` layout, the frequencies twice over.
    """
    emitted = torch.atan2(sin.double(), cos.double())
    exact = position_ids.to(emitted.device).double()[..., None] * inv_freq.to(emitted.device).double()
    frequencies = exact.shape[-1]
    if emitted.shape[-1] == 2 * frequencies:
        exact = torch.cat((exact, exact), dim=-1)
    elif emitted.shape[-1] != frequencies:
        raise ValueError(f"cos/sin width {emitted.shape[-1]} does not match {frequencies} frequencies")
    wrapped = torch.remainder(emitted - exact + math.pi, 2 * math.pi) - math.pi
    return wrapped.abs().amax()


class RopeProbe(Probe):
    """Max rotary angle error over the sampled step's rotary-embedding calls."""

    name = "rope"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.skipped_calls = 0
        self._skips_logged = LogOnce()
        self._max: torch.Tensor | None = None

    def attach(self, model: torch.nn.Module) -> None:
        for module in rotary_modules(model):
            self.hook_sampled(functools.partial(module.register_forward_hook, self.guarded(self._on_forward),
                                                with_kwargs=True))

    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    output: Any) -> None:
        if not self.sampled:
            return
        try:
            position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
            cos, sin = output
            with measuring():
                deviation = angle_deviation(cos, sin, position_ids, cast(torch.Tensor, module.inv_freq))
            self._max = deviation if self._max is None else torch.maximum(self._max, deviation)
        except Exception as exc:  # noqa: BLE001 - never raise into the forward pass
            self.skipped_calls += 1
            self._skips_logged(_logger, logging.WARNING, "skipped",
                               "otel_llm: rotary embedding call skipped (%s); further ones silently", exc)

    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        values = StepValues()
        if self._max is not None:
            values.gauge(ROPE_ANGLE_DEVIATION, self._max)
        self._max = None
        return values

    def reset(self) -> None:
        self._max = None
