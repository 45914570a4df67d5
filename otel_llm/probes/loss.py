"""The training loss and the loss-shape signals of sampled steps.

``llm.train.loss`` is the loss the loop produced, from the first source that
has one, in this order: a loss the user recorded; the Hugging Face Trainer's
``training_step`` values summed over the step's micro-batches (what the
Trainer and TRL's trainers log, whatever ``compute_loss`` does); the mean of
the model's own ``loss`` outputs (``ModelOutput.loss``, or the first element of
a tuple when it is a scalar); the mean of the step's ``F.cross_entropy`` results.

The loss-shape signals (per-token losses, skewness, z-loss) need the logits:
Hugging Face models, ``nn.CrossEntropyLoss`` and plain scripts all look
``F.cross_entropy`` up on ``torch.nn.functional`` at call time, so one patch of
that attribute sees every training loss without touching the model. The wrapper
returns the result untouched; the probe binds the call only on sampled steps.
A loss computed without it (a fused linear cross-entropy, TRL's fused LM head)
leaves that family absent, said once in an info line.

Per call (training, grad enabled) the probe recomputes, without gradients and
in float32, the per-token losses with the call's own options and the log-sum-exp
of the logits (both from one log-softmax pass), in chunks of
:data:`RECOMPUTE_CHUNK_BYTES` of float32 logits; everything stays on the device. ``finish()`` reduces the whole
step (all micro-batches) to the loss, skewness and z-loss plus a uniform,
on-device subsample of at most ``token_loss_samples`` per-token losses.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from otel_llm.catalog import LOGITS_Z_LOSS, LOSS_TOKEN, LOSS_TOKEN_SKEWNESS, TRAIN_LOSS
from otel_llm.probes._forward import in_step_forward, model_output_loss
from otel_llm.probes._measuring import measuring
from otel_llm.probes.base import Probe, StepValues
from otel_llm.probes.interception import Interception
from otel_llm.runtime import fork
from otel_llm.runtime.log_once import LogOnce

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["CROSS_ENTROPY", "RECOMPUTE_CHUNK_BYTES", "TRAINING_STEP", "CrossEntropyListener", "LossProbe",
           "bind_cross_entropy"]

_logger = logging.getLogger(__name__)

RECOMPUTE_CHUNK_BYTES = 64 * 2**20
"""float32 logits upcast at once by the recomputation: the rows per chunk follow from the vocabulary, so the
extra memory of a sampled step stays at a few chunks whatever the vocabulary (8,192 rows of a 50,257-entry
vocabulary were 1.6 GB)."""

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


_training_step = threading.local()


def _around_training_step(call: Callable[..., Any], listeners: tuple[Callable[[Any], None], ...],
                          args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    depth = getattr(_training_step, "depth", 0)
    _training_step.depth = depth + 1
    try:
        result = call(*args, **kwargs)
    finally:
        _training_step.depth = depth
    for listener in listeners:
        listener(result)
    return result


def inside_training_step() -> bool:
    """Whether this thread is inside ``Trainer.training_step`` (DeepSpeed updates in its backward call)."""
    return getattr(_training_step, "depth", 0) > 0


TRAINING_STEP: Interception[Callable[[Any], None]] = Interception("training_step")
"""The values Hugging Face ``Trainer.training_step`` returns: the loss the Trainer adds up and logs.

Under DeepSpeed the update runs inside the last micro-batch's ``training_step``
(accelerate's backward steps the engine), before that micro-batch's loss is returned."""
TRAINING_STEP.patch("transformers.trainer:Trainer", "training_step", _around_training_step)


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
        self._said = LogOnce()
        self.reset()

    def start(self, model_known: bool) -> None:
        self.listen(TRAINING_STEP, self.guarded(self._on_training_step))
        if self.family_enabled():
            self.listen(CROSS_ENTROPY, self.guarded(self._on_cross_entropy))

    def attach(self, model: torch.nn.Module) -> None:
        self.hook(model.register_forward_hook(self.guarded(self._on_model_output)))

    def _on_model_output(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.sampled and in_step_forward(module) and torch.is_grad_enabled():
            loss = model_output_loss(output)
            if loss is not None:
                self._output_losses.append(loss.detach().float())

    def _on_training_step(self, loss: Any) -> None:
        if self.sampled and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._step_losses.append(loss.detach().float().reshape(()))

    def _on_cross_entropy(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: torch.Tensor) -> None:
        if not self.sampled or fork.forked:
            return
        try:
            input, target, options = bind_cross_entropy(*args, **kwargs)
        except TypeError:  # a call shape the original accepted but we cannot read: not ours to judge
            return
        if isinstance(input, torch.Tensor) and input.requires_grad:
            self.on_call(input, target, options, result)

    def reset(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._valid: list[torch.Tensor] = []
        self._lse_sq: list[torch.Tensor] = []
        self._call_losses: list[torch.Tensor] = []
        self._manual_losses: list[torch.Tensor] = []
        self._step_losses: list[torch.Tensor] = []
        self._output_losses: list[torch.Tensor] = []

    @measuring()
    def on_call(self, input: torch.Tensor, target: torch.Tensor, options: dict[str, Any],
                result: torch.Tensor) -> None:
        """Record one training cross_entropy call (the caller checks that the step is sampled)."""
        logits, labels = _flatten(input.detach(), target.detach())
        losses, lse = [], []
        plain = options["weight"] is None and not options["label_smoothing"] and not labels.is_floating_point()
        rows = max(1, RECOMPUTE_CHUNK_BYTES // (4 * max(1, logits.shape[1])))
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start:start + rows].float()
            chunk_labels = labels[start:start + rows]
            # one fused log_softmax serves both: lse = max logit - log p(argmax), where log p is in [-log C, 0]
            log_probs = torch.log_softmax(chunk, dim=-1)
            top, top_index = chunk.max(dim=-1, keepdim=True)
            lse.append((top - log_probs.gather(1, top_index)).squeeze(1))
            if plain:  # the token loss is -log p at the target
                target_index = chunk_labels.clamp(0, chunk.shape[1] - 1).unsqueeze(1)
                losses.append(log_probs.gather(1, target_index).squeeze(1).neg_())
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

    def _train_loss(self) -> torch.Tensor | None:
        """The step's loss from the first source that saw one (see the module docstring)."""
        for values, reduce in ((self._manual_losses, torch.mean), (self._step_losses, torch.sum),
                               (self._output_losses, torch.mean), (self._call_losses, torch.mean)):
            if values:
                device = values[0].device
                return reduce(torch.stack([v.to(device) for v in values]))
        return None

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
        loss = self._train_loss()
        if loss is not None:
            out.gauge(TRAIN_LOSS, loss)
        if not self._losses:
            if loss is not None and self.family_enabled():
                self._said(_logger, logging.INFO, "no cross_entropy",
                     "otel_llm: the training loss was not computed through torch.nn.functional.cross_entropy "
                     "(a fused or custom loss kernel), so llm.loss.token, llm.loss.token_skewness and "
                     "llm.logits.z_loss are not exported; they need the logits of a cross_entropy call "
                     "(e.g. turn the fused loss off for a diagnostic run)")
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
