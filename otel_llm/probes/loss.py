"""Loss-shape signals from intercepted ``F.cross_entropy`` calls on sampled steps.

Hugging Face models, ``nn.CrossEntropyLoss`` and plain scripts all look the
function up on ``torch.nn.functional`` at call time, so one patch of that
attribute sees every training loss without touching the model. The wrapper
returns the result untouched; the probe binds the call only on sampled steps.

Per call (training, grad enabled) the probe recomputes, without gradients and
in float32, the per-token losses with the call's own options and the log-sum-exp
of the logits; everything stays on the device. ``finish()`` reduces the whole
step (all micro-batches) to the loss, skewness and z-loss plus a uniform,
on-device subsample of at most ``token_loss_samples`` per-token losses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from otel_llm.catalog import LOGITS_Z_LOSS, LOSS_TOKEN, LOSS_TOKEN_SKEWNESS, TRAIN_LOSS
from otel_llm.probes._measuring import measuring
from otel_llm.probes.base import Probe, StepValues, log_failure
from otel_llm.probes.interception import Interception
from otel_llm.runtime import fork

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["CROSS_ENTROPY", "CrossEntropyListener", "LossProbe", "bind_cross_entropy"]

_CHUNK_ROWS = 8192

CrossEntropyListener = Callable[[tuple[Any, ...], dict[str, Any], torch.Tensor], None]
"""Receives the raw (args, kwargs, result) of a cross_entropy call made with autograd on."""


def _deliver(call: Callable[..., Any], listeners: tuple[CrossEntropyListener, ...], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> torch.Tensor:
    result = call(*args, **kwargs)
    if torch.is_grad_enabled():
        for listener in listeners:
            listener(args, kwargs, result)
    return result


CROSS_ENTROPY: Interception[CrossEntropyListener] = Interception("cross_entropy")
_PATCH = CROSS_ENTROPY.patch(F, "cross_entropy", _deliver)


def _recompute(*args: Any, **kwargs: Any) -> torch.Tensor:
    """cross_entropy as the patch found it: the probe's own calls are not training losses to deliver."""
    call = _PATCH.underlying or F.cross_entropy
    return call(*args, **kwargs)


def bind_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                       size_average: bool | None = None, ignore_index: int = -100, reduce: bool | None = None,
                       reduction: str = "mean", label_smoothing: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Mirror of cross_entropy's signature: (input, target, normalised options)."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    return input, target, {"weight": weight, "ignore_index": ignore_index, "reduction": reduction,
                           "label_smoothing": label_smoothing}


def _flatten(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) logits and (M,) or (M, C) targets, whatever layout cross_entropy was given."""
    if logits.dim() == 1:
        return logits.unsqueeze(0), target.unsqueeze(0)
    classes = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, classes)
    if target.is_floating_point():
        return rows, target.movedim(1, -1).reshape(-1, classes)
    return rows, target.reshape(-1)


class LossProbe(Probe):
    """Collects one sampled step's per-token losses and logit statistics.

    Always built: a loss given to :meth:`record_manual_loss` steers the adaptive
    sampler even when every loss signal is disabled; the interceptor listens
    only when one is enabled.
    """

    name = "loss"
    always = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._max_tokens = config.token_loss_samples
        self._seed = config.update_sample_seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.reset()

    def start(self, model_known: bool) -> None:
        if self.family_enabled():
            self.listen(CROSS_ENTROPY, self._on_cross_entropy)

    def _on_cross_entropy(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: torch.Tensor) -> None:
        if not self.sampled or fork.forked:
            return
        try:
            input, target, options = bind_cross_entropy(*args, **kwargs)
        except TypeError:  # a call shape the original accepted but we cannot read: not ours to judge
            return
        if not isinstance(input, torch.Tensor) or not input.requires_grad:
            return
        timed = not torch.compiler.is_compiling()  # a clock read is a graph break under torch.compile
        started = time.perf_counter() if timed else 0.0
        try:
            self.on_call(input, target, options, result)
        except Exception:  # noqa: BLE001 - never raise into the training loop
            log_failure(self.name)
            self.reset()
        if timed:
            self.host_seconds += time.perf_counter() - started

    def reset(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._valid: list[torch.Tensor] = []
        self._lse_sq: list[torch.Tensor] = []
        self._call_losses: list[torch.Tensor] = []
        self._manual_losses: list[torch.Tensor] = []

    @measuring()
    def on_call(self, input: torch.Tensor, target: torch.Tensor, options: dict[str, Any],
                result: torch.Tensor) -> None:
        """Record one training cross_entropy call (the caller checks that the step is sampled)."""
        logits, labels = _flatten(input.detach(), target.detach())
        losses, lse = [], []
        plain = options["weight"] is None and not options["label_smoothing"] and not labels.is_floating_point()
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            chunk = logits[start:start + _CHUNK_ROWS].float()
            chunk_labels = labels[start:start + _CHUNK_ROWS]
            chunk_lse = torch.logsumexp(chunk, dim=-1)
            lse.append(chunk_lse)
            if plain:  # -log softmax at the target = lse - logit[target], without a second pass
                picked = chunk.gather(1, chunk_labels.clamp(0, chunk.shape[1] - 1).unsqueeze(1)).squeeze(1)
                losses.append(chunk_lse - picked)
                continue
            losses.append(_recompute(
                chunk, chunk_labels.float() if chunk_labels.is_floating_point() else chunk_labels,
                weight=None if options["weight"] is None else options["weight"].float(),
                ignore_index=options["ignore_index"], reduction="none",
                label_smoothing=options["label_smoothing"]))
        token_loss = torch.cat(losses)
        if labels.is_floating_point():
            valid = torch.ones_like(token_loss, dtype=torch.bool)
        else:
            valid = labels != options["ignore_index"]
        lse_sq = torch.cat(lse).square()
        self._losses.append(token_loss)
        self._valid.append(valid)
        self._lse_sq.append(torch.where(valid, lse_sq, 0.0))
        value = result.detach().float()
        if options["reduction"] == "sum":
            value = value / valid.sum().clamp_min(1)
        elif options["reduction"] == "none":
            flat = value.reshape(-1)
            value = torch.where(valid, flat, 0.0).sum() / valid.sum().clamp_min(1)
        self._call_losses.append(value.reshape(()))

    def record_manual_loss(self, value: float | torch.Tensor) -> None:
        """A loss reported by the user; it replaces the intercepted one for this step."""
        self._manual_losses.append(value.detach().float().reshape(()) if isinstance(value, torch.Tensor)
                                   else torch.tensor(float(value)))

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator

    @measuring()
    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        """Device tensors for the step's loss signals; empty when no loss was seen."""
        out = StepValues()
        if self._manual_losses:
            device = self._manual_losses[0].device
            out.gauge(TRAIN_LOSS, torch.stack([v.to(device) for v in self._manual_losses]).mean())
        elif self._call_losses:
            device = self._call_losses[0].device
            out.gauge(TRAIN_LOSS, torch.stack([v.to(device) for v in self._call_losses]).mean())
        if not self._losses:
            self.reset()
            return out
        device = self._losses[0].device
        losses = torch.cat([t.to(device) for t in self._losses]).double()
        valid = torch.cat([t.to(device) for t in self._valid])
        count = valid.sum().clamp_min(1)
        mean = torch.where(valid, losses, 0.0).sum() / count
        centred = torch.where(valid, losses - mean, 0.0)
        m2 = centred.square().sum() / count
        m3 = centred.pow(3).sum() / count
        out.gauge(LOSS_TOKEN_SKEWNESS, torch.where(m2 > 0, m3 / m2.clamp_min(1e-300).pow(1.5), m3 * 0.0))
        out.gauge(LOGITS_Z_LOSS, torch.cat([t.to(device) for t in self._lse_sq]).double().sum() / count)
        keys = torch.rand(losses.shape[0], generator=self._generator(device), device=device)
        keys = torch.where(valid, keys, 2.0)
        chosen = torch.topk(keys, min(self._max_tokens, losses.shape[0]), largest=False).indices
        out.histogram(LOSS_TOKEN, losses[chosen], keep=valid[chosen])
        self.reset()
        return out
