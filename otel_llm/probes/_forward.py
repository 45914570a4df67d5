"""What hooks inside a model's forward pass share: which calls belong to the step, and which positions are tokens.

Per-token statistics (activation sparsity and outliers, LoRA activations) are
taken over the step's real tokens: the outermost model call knows the
attention mask, so a pre-hook keeps it and hooks deeper in the model drop
padding with it, on the device. Calls replayed by
activation checkpointing during backward are not counted again.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from otel_llm.environment_variables import OTEL_LLM_LAYERS_PATH
from otel_llm.probes._layers import LayerIndex, find_layer_stack

__all__ = ["TokenMask", "first_tensor", "in_backward", "in_step_forward", "layer_index", "model_output_loss"]

_logger = logging.getLogger(__name__)
_indexes: weakref.WeakKeyDictionary[torch.nn.Module, tuple[str | None, LayerIndex | None]] = \
    weakref.WeakKeyDictionary()


def in_backward() -> bool:
    """True while autograd runs a backward pass: a forward now is activation checkpointing's replay.

    Under torch.compile hooks are traced into the forward graph (the graph-task
    query would break it in two), and a compiled graph replays checkpointed
    regions without calling Python hooks, so a traced hook is never in backward.
    """
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def in_step_forward(module: torch.nn.Module) -> bool:
    """True for a training forward of the step; False for eval passes and checkpoint replays in backward.

    Training mode covers reentrant checkpointing's no-grad first pass; the replay
    runs inside the autograd engine, where the step's forward already counted it.
    """
    return (module.training or torch.is_grad_enabled()) and not in_backward()


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a module call is about: the value itself or the first element of a tuple/list."""
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return value if isinstance(value, torch.Tensor) else None


def model_output_loss(output: Any) -> torch.Tensor | None:
    """The loss a model returned, as the Trainer reads it: ``output["loss"]``, or a scalar ``output[0]``."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        return None
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def layer_index(model: torch.nn.Module, path: str | None) -> LayerIndex | None:
    """The model's decoder layer index, or None after one log line naming the override.

    Shared per model, so probes attaching to the same model find it once and log once.
    """
    cached = _indexes.get(model)
    if cached is not None and cached[0] == path:
        return cached[1]
    index: LayerIndex | None = None
    try:
        if find_layer_stack(model, path) is None:
            _logger.info("otel_llm: no decoder layer stack found in %s; llm.activation.* and llm.lora.* are not "
                         "exported (set %s to name it)", type(model).__name__, OTEL_LLM_LAYERS_PATH)
        else:
            index = LayerIndex(model, path)
    except ValueError as exc:
        _logger.warning("otel_llm: %s; llm.activation.* and llm.lora.* are not exported", exc)
    _indexes[model] = (path, index)
    return index


class TokenMask:
    """The 2-D attention mask of the latest model call, for hooks on inner modules.

    Only a pre-hook: the next call replaces the mask, and :meth:`clear` drops it
    at step boundaries; positions are used only when the shapes match.
    """

    def __init__(self) -> None:
        self._mask: torch.Tensor | None = None

    def hook(self, model: torch.nn.Module) -> Callable[[], RemovableHandle]:
        """What registers the mask-reading pre-hook on ``model`` (for :meth:`Probe.hook_sampled`)."""
        return functools.partial(model.register_forward_pre_hook, self._enter, with_kwargs=True)

    def clear(self) -> None:
        self._mask = None

    def _enter(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def positions(self, x: torch.Tensor) -> torch.Tensor | None:
        """A bool tensor of real tokens broadcastable over ``x``, or None to count every position.

        ``x`` is (batch, seq, ...) or, as some models (OPT) flatten it, (batch * seq, features).
        """
        mask = self._mask
        if mask is None:
            return None
        if x.dim() >= 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            return (mask != 0).to(x.device).reshape(*mask.shape, *(1,) * (x.dim() - 2))
        if x.dim() == 2 and x.shape[0] == mask.numel():
            return (mask != 0).to(x.device).reshape(-1, 1)
        return None
