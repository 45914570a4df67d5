"""Model FLOPs executed (``llm.train.flops``) and model FLOPs utilisation (``llm.train.mfu``).

The first training forward of each input shape is counted with torch's
FlopCounterMode from that forward to the next one or to the end of the step
(forward, loss and backward of one micro-batch); every later forward of the
shape adds the stored count, so counting costs one slowed micro-batch per
shape, never a step's worth of work per step. When counting is impossible
(the count fails, or finds nothing because the model is compiled) the shape
gets the analytic estimate instead, labelled ``llm.flops.method=analytic``.

MFU is this rank's FLOPs since the previous sampled step over the wall time
since then and the device's peak (:mod:`otel_llm.probes._peak_flops`, or
``OTEL_LLM_PEAK_FLOPS``); without a peak there is no MFU series at all, and a
window holding a count (slowed by counting) reports none either.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from otel_llm.catalog import ATTR_FLOPS_METHOD, TRAIN_FLOPS, TRAIN_MFU
from otel_llm.probes._flop_count import ModelCount
from otel_llm.probes._forward import in_step_forward
from otel_llm.probes._peak_flops import matmul_dtype, peak_flops
from otel_llm.probes.base import Probe, StepValues
from otel_llm.runtime.log_once import once

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["FlopProbe", "analytic_flops", "input_shape"]

_logger = logging.getLogger(__name__)
COUNTED, ANALYTIC = "counted", "analytic"
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model")

ShapeKey = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


def input_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[ShapeKey, tuple[int, int] | None]:
    """The call's tensor shapes (what a count is valid for) and its (batch, sequence) when it has token ids."""
    named = [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items())
    key = tuple((name, tuple(value.shape), value.dtype) for name, value in named if isinstance(value, torch.Tensor))
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        ids = next((v for _, v in named if isinstance(v, torch.Tensor) and not v.is_floating_point()
                    and v.dtype != torch.bool and v.dim() >= 1), None)
    if ids is None:
        embeds = kwargs.get("inputs_embeds")
        if isinstance(embeds, torch.Tensor) and embeds.dim() >= 3:
            return key, (int(embeds.shape[0]), int(embeds.shape[1]))
        return key, None
    batch = int(ids.shape[0]) if ids.dim() >= 2 else 1
    return key, (batch, int(ids.shape[-1]))


def _config_int(model: torch.nn.Module, names: tuple[str, ...]) -> int | None:
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters outside embedding tables, plus an output head that shares an embedding table."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    outputs = getattr(model, "get_output_embeddings", None)
    head = outputs() if callable(outputs) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and id(weight) in embeddings:
        total += weight.numel()
    return total


def analytic_flops(model: torch.nn.Module, batch: int, sequence: int) -> int:
    """6 N tokens + 12 layers x sequence x hidden x tokens (attention scores and values, forward + backward).

    N: parameters outside embedding tables (a tied output head counted once);
    the attention term needs the model config's layer count and hidden size.
    """
    tokens = batch * sequence
    flops = 6 * _matmul_parameters(model) * tokens
    layers, hidden = _config_int(model, _LAYERS), _config_int(model, _HIDDEN)
    if layers is not None and hidden is not None:
        flops += 12 * layers * sequence * hidden * tokens
    return flops


class FlopProbe(Probe):
    """Counts each input shape once and adds its FLOPs to every forward of that shape."""

    name = "flops"
    every_step = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._per_shape: dict[ShapeKey, tuple[int, str]] = {}
        self._counting: tuple[ShapeKey, ModelCount, int | None] | None = None
        self._pending = {COUNTED: 0, ANALYTIC: 0}
        self._window_flops = 0
        self._window_start: float | None = None
        self._window_counted = False
        self._peak: float | None = None
        self._peak_known = False

    def attach(self, model: torch.nn.Module) -> None:
        self.hook(model.register_forward_pre_hook(self.guarded(self._on_forward), with_kwargs=True))

    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled() and in_step_forward(module)):
            return
        if self._window_start is None:
            self._window_start = time.perf_counter()
        self._finish_count()
        if not self._peak_known:
            self._find_peak(module)
        key, tokens = input_shape(args, kwargs)
        known = self._per_shape.get(key)
        if known is not None:
            self._add(*known)
            return
        estimate = analytic_flops(module, *tokens) if tokens is not None else None
        if ModelCount.busy() or torch.compiler.is_compiling():
            self._remember(key, estimate, "a count is already in progress or the model is being compiled")
            return
        count = ModelCount()
        try:
            count.start()
        except Exception:  # noqa: BLE001 - FlopCounterMode cannot run here: the estimate stands in
            self._remember(key, estimate, "FlopCounterMode could not start")
            return
        self._counting = (key, count, estimate)
        self._window_counted = True

    def _finish_count(self) -> None:
        if self._counting is None:
            return
        key, count, estimate = self._counting
        self._counting = None
        try:
            flops = count.stop()
        except Exception:  # noqa: BLE001 - an op the counter cannot handle: the estimate stands in
            self._remember(key, estimate, "FlopCounterMode failed")
            return
        if flops <= 0:
            self._remember(key, estimate, "FlopCounterMode saw no FLOPs (a compiled model?)")
            return
        self._per_shape[key] = (flops, COUNTED)
        self._add(flops, COUNTED)

    def _remember(self, key: ShapeKey, estimate: int | None, why: str) -> None:
        """Store the analytic estimate for ``key`` (when there is one) and add it for this forward."""
        if estimate is None:
            once(_logger, logging.INFO, ("no flops", why), "otel_llm: %s and the forward has no token ids to "
                 "estimate FLOPs from; llm.train.flops leaves such calls out", why)
            self._per_shape[key] = (0, ANALYTIC)
            return
        once(_logger, logging.INFO, ("analytic flops", why), "otel_llm: %s; llm.train.flops uses the analytic "
             "estimate 6 x parameters x tokens + attention (llm.flops.method=analytic)", why)
        self._per_shape[key] = (estimate, ANALYTIC)
        self._add(estimate, ANALYTIC)

    def _add(self, flops: int, method: str) -> None:
        self._pending[method] += flops
        self._window_flops += flops

    def _find_peak(self, module: torch.nn.Module) -> None:
        self._peak_known = True
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = matmul_dtype(device, parameter.dtype if parameter is not None else torch.float32)
        if self.config.peak_flops is not None:
            self._peak = self.config.peak_flops
            return
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self._peak = peak_flops(name, dtype)
        if self._peak is None:
            once(_logger, logging.INFO, ("no peak", name, dtype), "otel_llm: no peak FLOP/s known for %s in %s; "
                 "set OTEL_LLM_PEAK_FLOPS (per device) to export llm.train.mfu", name, dtype)

    # -- per step -----------------------------------------------------------------
    def end_step(self) -> None:
        self._finish_count()

    def tally(self) -> StepValues:
        values = StepValues()
        for method, flops in self._pending.items():
            if flops:
                values.count(TRAIN_FLOPS, flops, {ATTR_FLOPS_METHOD: method})
                self._pending[method] = 0
        return values

    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        """MFU over the window since the previous sampled step (none while a count slowed it, or no peak)."""
        values = StepValues()
        now = time.perf_counter()
        if (self._peak is not None and self._window_start is not None and not self._window_counted
                and self._window_flops and now > self._window_start):
            values.gauge(TRAIN_MFU, self._window_flops / (now - self._window_start) / self._peak)
        self._window_flops, self._window_start, self._window_counted = 0, now, False
        return values

    def reset(self) -> None:
        """A hook failed mid-step: a count in progress is partial, so the shape gets the estimate instead."""
        if self._counting is None:
            return
        key, count, estimate = self._counting
        self._counting = None
        try:
            count.stop()
        except Exception:  # noqa: BLE001 - the count is discarded either way
            pass
        self._remember(key, estimate, "a FLOP count was cut short by a failing hook")
