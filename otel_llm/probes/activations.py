"""Activation probe: signals #12 (MLP activation sparsity) and #13 (hidden-state outliers) per decoder layer.

#12 reads the input of each layer's MLP output projection (the MLP's
intermediate activations); #13 reads each decoder layer's output and keeps, per
hidden dimension, the running max abs over the step's tokens. Both accumulate
on the device across the step's micro-batches and leave out padding when the
model call carries a 2-D attention mask. The projection is found by name in
each decoder layer (transformers' Llama/Mistral/Qwen2 ``mlp.down_proj``, GPT-2
and nanoGPT ``mlp.c_proj``, GPT-NeoX ``mlp.dense_4h_to_h``, OPT ``fc2``) or
named with ``Config.mlp_output_path``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from otel_llm.catalog import ACTIVATION_OUTLIER_RATIO, ACTIVATION_SPARSITY, ATTR_LAYER
from otel_llm.config import Config
from otel_llm.environment_variables import OTEL_LLM_MLP_OUTPUT_PATH
from otel_llm.probes._forward import TokenMask, first_tensor, in_step_forward, layer_index
from otel_llm.probes._measuring import measuring
from otel_llm.probes._tensor_stats import floor_in_dtype
from otel_llm.probes.base import Probe, StepValues

__all__ = ["MLP_OUTPUT_PATHS", "ActivationProbe", "mlp_output"]

_logger = logging.getLogger(__name__)

MLP_OUTPUT_PATHS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "fc2")
"""MLP output projections, relative to a decoder layer, tried in this order."""
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Activation dtypes whose sparsity floor is known before the first forward; others get theirs on first sight."""


def mlp_output(layer: torch.nn.Module, path: str | None = None) -> torch.nn.Module | None:
    """The MLP output projection of a decoder layer: ``path`` if given, else the first known name present."""
    for candidate in (path,) if path else MLP_OUTPUT_PATHS:
        try:
            return layer.get_submodule(candidate)
        except AttributeError:
            continue
    return None


class _LayerStats:
    """Device accumulators of one decoder layer over a step."""

    __slots__ = ("peak", "small", "total")

    def __init__(self) -> None:
        self.small: torch.Tensor | None = None
        self.total: torch.Tensor | int = 0
        self.peak: torch.Tensor | None = None


class ActivationProbe(Probe):
    """Per-layer MLP activation sparsity and hidden-dimension outlier ratio of sampled steps."""

    name = "activations"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._mask = TokenMask()
        self._stats: dict[int, _LayerStats] = {}
        # The threshold as compared in each dtype, found here: reading it back from a tensor inside a hook
        # would split a torch.compile graph in two.
        self._floors = {dtype: floor_in_dtype(config.activation_sparsity_threshold, dtype) for dtype in _FLOAT_DTYPES}

    def attach(self, model: torch.nn.Module) -> None:
        cfg = self.config
        index = layer_index(model, cfg.layers_path)
        if index is None:
            return
        missing: list[int] = []
        for position, layer in index.layers():
            if not cfg.is_disabled(ACTIVATION_OUTLIER_RATIO):
                self.hook_sampled(functools.partial(layer.register_forward_hook,
                                                    self.guarded(self._on_layer_output(position))))
            if cfg.is_disabled(ACTIVATION_SPARSITY):
                continue
            projection = mlp_output(layer, cfg.mlp_output_path)
            if projection is None:
                missing.append(position)
                continue
            self.hook_sampled(functools.partial(projection.register_forward_pre_hook,
                                                self.guarded(self._on_mlp_input(position)), with_kwargs=True))
        if missing:
            tried = cfg.mlp_output_path or ", ".join(MLP_OUTPUT_PATHS)
            _logger.info("otel_llm: no MLP output projection (%s) in %d of %d decoder layers of %s; "
                         "llm.activation.sparsity is not exported for them (set %s to name it)",
                         tried, len(missing), len(index), type(model).__name__, OTEL_LLM_MLP_OUTPUT_PATH)
        if self._sampled_hooks:
            self.hook_sampled(self._mask.hook(model))

    def detach(self) -> None:
        self._mask.clear()
        super().detach()

    # -- hooks --------------------------------------------------------------
    def _layer(self, position: int) -> _LayerStats:
        stats = self._stats.get(position)
        if stats is None:
            stats = self._stats[position] = _LayerStats()
        return stats

    def _on_mlp_input(self, position: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.sampled or not in_step_forward(module):
                return
            x = first_tensor(args) if args else first_tensor(tuple(kwargs.values()))
            if x is None or not x.is_floating_point():
                return
            with measuring():
                floor = self._floors.get(x.dtype)
                if floor is None:
                    floor = self._floors[x.dtype] = floor_in_dtype(self.config.activation_sparsity_threshold,
                                                                   x.dtype)
                small = x.detach().abs() <= floor
                keep = self._mask.positions(x)
                if keep is None:
                    total: torch.Tensor | int = small.numel()
                else:
                    small &= keep
                    total = keep.sum() * x.shape[-1]
                stats = self._layer(position)
                count = small.sum()
                stats.small = count if stats.small is None else stats.small + count
                stats.total = stats.total + total

        return hook

    def _on_layer_output(self, position: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.sampled or not in_step_forward(module):
                return
            hidden = first_tensor(output)
            if hidden is None or not hidden.is_floating_point() or hidden.dim() < 2:
                return
            with measuring():
                magnitude = hidden.detach().abs()
                keep = self._mask.positions(hidden)
                if keep is not None:
                    magnitude.masked_fill_(~keep, 0)
                peak = magnitude.reshape(-1, magnitude.shape[-1]).amax(dim=0)
                stats = self._layer(position)
                stats.peak = peak if stats.peak is None else torch.maximum(stats.peak, peak)

        return hook

    # -- step ---------------------------------------------------------------
    def begin_step(self, sampled: bool) -> None:
        super().begin_step(sampled)
        self._mask.clear()
        self._stats = {}

    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        values = StepValues()
        threshold = self.config.activation_outlier_threshold
        for position in sorted(self._stats):
            stats = self._stats[position]
            attributes = {ATTR_LAYER: str(position)}
            if stats.small is not None:
                values.gauge(ACTIVATION_SPARSITY, stats.small.double() / stats.total, attributes)
            if stats.peak is not None:
                values.gauge(ACTIVATION_OUTLIER_RATIO, (stats.peak.double() >= threshold).double().mean(),
                             attributes)
        self._stats = {}
        return values

    def reset(self) -> None:
        self._stats = {}
