"""Attention probe: signals #8-#11 per decoder layer, from SDPA, eager and explicit-softmax attention.

Forward hooks on the decoder layers say which layer is running; the
interceptors of :mod:`otel_llm.probes._attention_calls` deliver each attention
call, and on sampled steps the call's inputs are folded into that layer's
:class:`LayerStatistics`. On other steps the hooks and listeners return after
one attribute read. Only training forwards count (grad enabled, or a layer in
training mode, which covers reentrant activation checkpointing's no-grad first
pass); calls made while autograd replays a checkpointed forward during
backward are skipped because the step's forward already counted them.
When no decoder layer stack is found, the n-th attention call of each model
forward is attributed to layer n. A layer seen only through explicit softmax
scores has no head divergence (the values are not visible there).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from otel_llm.catalog import (
    ATTENTION_HEAD_DIVERGENCE_MAX,
    ATTENTION_HEAD_ENTROPY,
    ATTENTION_LOGIT_MAX,
    ATTENTION_SINK_RATIO,
    ATTR_LAYER,
)
from otel_llm.config import Config
from otel_llm.probes._attention_calls import ATTENTION, AttentionCall, ScoresCall, eager_patches
from otel_llm.probes._attention_stats import LayerStatistics
from otel_llm.probes._forward import in_backward
from otel_llm.probes._layers import LayerIndex
from otel_llm.probes._measuring import measuring
from otel_llm.probes.base import Probe, StepValues
from otel_llm.runtime.log_once import LogOnce

__all__ = ["AttentionProbe"]

_logger = logging.getLogger(__name__)


class AttentionProbe(Probe):
    """Per-layer head entropy, head divergence, logit max and sink ratio of sampled steps."""

    name = "attention"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.skipped_calls = 0
        self._skips_logged = LogOnce()
        self._layers: dict[int, LayerStatistics] = {}
        self._current: list[tuple[int, bool]] = []
        self._calls_in_forward = 0
        self._by_order = False

    def attach(self, model: torch.nn.Module) -> None:
        index = LayerIndex(model, self.config.layers_path)
        if len(index):
            for position, layer in index.layers():
                self.hook_sampled(functools.partial(layer.register_forward_pre_hook,
                                                    self.guarded(self._enter(position))))
                self.hook_sampled(functools.partial(layer.register_forward_hook, self.guarded(self._leave),
                                                    always_call=True))
        else:
            self._by_order = True
            self.hook_sampled(functools.partial(model.register_forward_pre_hook, self._new_forward))
        for patch in eager_patches(model):
            self.use(patch)
        self.listen(ATTENTION, self.guarded(self._on_call))

    # -- hooks --------------------------------------------------------------
    def _enter(self, position: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if self.sampled:
                self._current.append((position, module.training))

        return hook

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.sampled and self._current:
            self._current.pop()

    def _new_forward(self, module: torch.nn.Module, args: Any) -> None:
        self._calls_in_forward = 0

    def _on_call(self, bind: Callable[[], AttentionCall | ScoresCall]) -> None:
        if not self.sampled or in_backward():
            return
        if self._by_order:
            if not torch.is_grad_enabled():
                return
            layer = self._calls_in_forward
            self._calls_in_forward += 1
        elif self._current:
            layer, training = self._current[-1]
            if not (training or torch.is_grad_enabled()):
                return
        else:
            return  # attention outside the decoder stack (another model, a vision tower)
        try:
            call = bind()
            with measuring():
                lead = call.scores if isinstance(call, ScoresCall) else call.query
                stats = self._layers.get(layer)
                if stats is None:
                    stats = LayerStatistics(lead.shape[1] if lead.dim() == 4 else 0, lead.device)
                if isinstance(call, ScoresCall):
                    stats.add_scores(call, self.config.attention_queries)
                else:
                    stats.add(call, self.config.attention_queries)
                self._layers[layer] = stats  # a layer appears once one of its calls was understood
        except Exception as exc:  # noqa: BLE001 - an unfamiliar call is skipped, never raised into training
            self._skip(exc)

    def _skip(self, exc: Exception) -> None:
        self.skipped_calls += 1
        self._skips_logged(_logger, logging.WARNING, type(exc).__name__,
                           "otel_llm: attention call skipped (%s); further such calls are skipped silently", exc)

    # -- step ---------------------------------------------------------------
    def begin_step(self, sampled: bool) -> None:
        super().begin_step(sampled)
        self._current.clear()

    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        values = StepValues()
        cfg = self.config
        for layer in sorted(self._layers):
            stats = self._layers[layer]
            attributes = {ATTR_LAYER: str(layer)}
            if not cfg.is_disabled(ATTENTION_HEAD_ENTROPY):
                entropy, keep = stats.entropy()
                values.histogram(ATTENTION_HEAD_ENTROPY, entropy, attributes, keep)
            if stats.has_outputs and not cfg.is_disabled(ATTENTION_HEAD_DIVERGENCE_MAX):
                values.gauge(ATTENTION_HEAD_DIVERGENCE_MAX, stats.divergence_max(), attributes)
            if not cfg.is_disabled(ATTENTION_LOGIT_MAX):
                values.gauge(ATTENTION_LOGIT_MAX, stats.logit_max, attributes)
            if not cfg.is_disabled(ATTENTION_SINK_RATIO):
                values.gauge(ATTENTION_SINK_RATIO, stats.sink_ratio(), attributes)
        self._layers = {}
        return values

    def reset(self) -> None:
        self._layers = {}
        self._current.clear()
