"""Token counting from the model's forward calls, and finding that model in zero-code mode.

In zero-code mode the model is unknown: two global module hooks track call
depth, and the first outermost training forward (training mode, grad enabled,
a trainable parameter, not a checkpoint replay inside backward) names the
model. It is adopted in that call's pre-hook, so every probe measures step 0;
the global hooks are removed and a single forward hook stays on that model.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.modules import module as nn_module

from otel_llm.catalog import TRAIN_TOKENS
from otel_llm.probes._forward import in_backward
from otel_llm.probes.base import Probe, StepValues

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["TokenProbe"]


_ID_NAMES = ("input_ids", "idx", "tokens", "input")
_LABEL_NAMES = ("labels", "targets", "target", "attention_mask", "position_ids")


def _count(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | torch.Tensor | None:
    """Non-padding tokens of one forward call: attention_mask.sum() when given, else input_ids.numel()."""
    ids = next((kwargs[k] for k in _ID_NAMES if isinstance(kwargs.get(k), torch.Tensor)), None)
    if ids is None:
        candidates = [*args, *(v for k, v in kwargs.items() if k not in _LABEL_NAMES)]
        ids = next((a for a in candidates if isinstance(a, torch.Tensor) and not a.is_floating_point()
                    and a.dtype != torch.bool), None)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and ids is not None and mask.shape == ids.shape:
        return mask.sum()
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2:
        return embeds.shape[0] * embeds.shape[1]
    return None


def _is_training_model(module: torch.nn.Module) -> bool:
    return module.training and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


def _call_kwargs(module: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments of ``module``'s call whose global forward pre-hooks are running.

    torch hands global pre-hooks only the positional arguments; the model's own
    pre-hooks, installed during this call, need the keywords (the attention mask).
    They are the ``kwargs`` of torch's ``Module._call_impl`` a few frames up; when
    that frame is not found the call's hooks see none (every position counts once).
    """
    frame = sys._getframe(1)
    for _ in range(6):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            break
        local = frame.f_locals
        if local.get("self") is module and isinstance(local.get("kwargs"), dict):
            return local["kwargs"]
    return {}


def _run_new_pre_hooks(module: torch.nn.Module, before: set[int], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> None:
    """Run the pre-hooks added to ``module`` since ``before`` for the call already past them."""
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id not in before:
            if hook_id in module._forward_pre_hooks_with_kwargs:
                hook(module, args, kwargs)
            else:
                hook(module, args)


class TokenProbe(Probe):
    """Accumulates tokens of training forward passes until :meth:`tally` reads them.

    Always built: in zero-code mode it is what finds the model.
    """

    name = "tokens"
    always = True
    every_step = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._host = 0
        self._device: torch.Tensor | None = None
        self._depth = threading.local()
        self._adopt: Callable[[torch.nn.Module], None] | None = None
        self.model: weakref.ref[torch.nn.Module] | None = None

    def _add(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        count = _count(args, kwargs)
        if isinstance(count, torch.Tensor):
            self._device = count if self._device is None else self._device + count.to(self._device.device)
        elif count is not None:
            self._host += count

    def _on_model_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                          output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._add(args, kwargs)

    def attach(self, model: torch.nn.Module) -> None:
        """Count the tokens of ``model``'s training forward calls."""
        self._unhook()
        self.model = weakref.ref(model)
        self.hook(model.register_forward_hook(self._on_model_forward, with_kwargs=True))

    # -- zero-code discovery -------------------------------------------------
    def discover(self, adopt: Callable[[torch.nn.Module], None]) -> None:
        """Install the global depth-tracking hooks; ``adopt`` attaches every probe to the model found."""
        self._adopt = adopt
        self.hook(nn_module.register_module_forward_pre_hook(self._on_enter))
        self.hook(nn_module.register_module_forward_hook(self._on_exit, always_call=True))

    def _on_enter(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if in_backward():
            return  # activation checkpointing replaying part of the model
        depth = getattr(self._depth, "value", 0)
        if depth == 0 and self._adopt is not None and _is_training_model(module):
            adopt, self._adopt = self._adopt, None
            before = set(module._forward_pre_hooks)
            adopt(module)  # removes these global hooks
            _run_new_pre_hooks(module, before, args, _call_kwargs(module))
            return
        self._depth.value = depth + 1

    def _on_exit(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not in_backward():
            self._depth.value = max(getattr(self._depth, "value", 1) - 1, 0)

    def tally(self) -> StepValues:
        """Tokens counted since the last tally: a host part and a device part (read off-thread)."""
        values = StepValues()
        host, device = self._host, self._device
        self._host, self._device = 0, None
        if host:
            values.count(TRAIN_TOKENS, host)
        if device is not None:
            values.count(TRAIN_TOKENS, device)
        return values

    def _unhook(self) -> None:
        super().detach()

    def detach(self) -> None:
        self._unhook()
        self.model = None
