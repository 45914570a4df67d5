"""Token counting from the model's forward calls, and finding that model in zero-code mode.

In zero-code mode the model is unknown: two global module hooks track call
depth, count tokens at every outermost training forward and remember those
modules; once the optimizer is known, the outermost module that owns its
parameters is adopted, the global hooks are removed and a single forward hook
stays on that model.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.modules import module as nn_module

from otel_llm.catalog import TRAIN_TOKENS
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
        self._roots: list[weakref.ref[torch.nn.Module]] = []
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

    def start(self, model_known: bool) -> None:
        if not model_known:
            self._discover()

    def attach(self, model: torch.nn.Module) -> None:
        """Count the tokens of ``model``'s training forward calls."""
        self._unhook()
        self.model = weakref.ref(model)
        self.hook(model.register_forward_hook(self._on_model_forward, with_kwargs=True))

    # -- zero-code discovery -------------------------------------------------
    def _discover(self) -> None:
        """Install the global depth-tracking hooks until :meth:`find_model` finds the model."""
        self.hook(nn_module.register_module_forward_pre_hook(self._on_enter))
        self.hook(nn_module.register_module_forward_hook(self._on_exit, with_kwargs=True, always_call=True))

    def _on_enter(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._depth.value = getattr(self._depth, "value", 0) + 1

    def _on_exit(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        depth = getattr(self._depth, "value", 1) - 1
        self._depth.value = max(depth, 0)
        if depth == 0 and module.training and torch.is_grad_enabled():
            self._add(args, kwargs)
            if not any(ref() is module for ref in self._roots):
                self._roots.append(weakref.ref(module))

    def find_model(self, params: list[torch.Tensor]) -> torch.nn.Module | None:
        """The outermost module seen that owns any of ``params``; the discovery hooks go either way.

        The session attaches every probe, this one included, to the module found.
        """
        wanted = {id(p) for p in params}
        found = None
        for ref in reversed(self._roots):
            module = ref()
            if module is not None and any(id(p) in wanted for p in module.parameters()):
                found = module
                break
        self._unhook()
        self._roots.clear()
        return found

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
