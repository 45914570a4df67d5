"""Loss-shape signals from intercepted cross_entropy calls on sampled steps.

Per call (training, grad enabled) the probe recomputes, without gradients and
in float32, the per-token losses with the call's own options and the log-sum-exp
of the logits; everything stays on the device. ``finish()`` reduces the whole
step (all micro-batches) to the loss, skewness and z-loss plus a uniform,
on-device subsample of at most ``max_tokens`` per-token losses.
"""

from __future__ import annotations

from typing import Any

import torch

from otel_llm.catalog import LOGITS_Z_LOSS, LOSS_TOKEN, LOSS_TOKEN_SKEWNESS, TRAIN_LOSS
from otel_llm.probes.base import StepValues
from otel_llm.probes.cross_entropy import original_cross_entropy

__all__ = ["LossProbe"]

_CHUNK_ROWS = 8192


def _flatten(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) logits and (M,) or (M, C) targets, whatever layout cross_entropy was given."""
    if logits.dim() == 1:
        return logits.unsqueeze(0), target.unsqueeze(0)
    classes = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, classes)
    if target.is_floating_point():
        return rows, target.movedim(1, -1).reshape(-1, classes)
    return rows, target.reshape(-1)


class LossProbe:
    """Collects one sampled step's per-token losses and logit statistics."""

    def __init__(self, max_tokens: int, seed: int = 0) -> None:
        self._max_tokens = max_tokens
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.reset()

    def reset(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._valid: list[torch.Tensor] = []
        self._lse_sq: list[torch.Tensor] = []
        self._call_losses: list[torch.Tensor] = []
        self._manual_losses: list[float] = []

    @torch.no_grad()
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
            losses.append(original_cross_entropy(
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

    @torch.no_grad()
    def finish(self) -> StepValues:
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
