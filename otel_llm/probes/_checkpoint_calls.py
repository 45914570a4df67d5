"""Where checkpoint saves are seen, and how long each blocked the training thread.

Patched while a step-time probe listens: ``torch.save`` (plain scripts, nanoGPT,
Lightning's checkpoint IO), ``torch.distributed.checkpoint.save`` and
``async_save`` (the blocking part: staging, before the background write),
``PreTrainedModel.save_pretrained`` and ``Trainer._save_checkpoint`` (model,
optimizer and scheduler state together). Only the outermost call on a thread is
delivered, so a Trainer checkpoint built on save_pretrained and torch.save is
one save, timed whole.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from otel_llm.probes.interception import Interception

__all__ = ["CHECKPOINT", "SaveListener"]

SaveListener = Callable[[float], None]
"""Receives the seconds one outermost save took."""

_inside = threading.local()


def _around_save(call: Callable[..., Any], listeners: tuple[SaveListener, ...], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    if getattr(_inside, "value", False):
        return call(*args, **kwargs)
    _inside.value = True
    started = time.perf_counter()
    try:
        return call(*args, **kwargs)
    finally:
        _inside.value = False
        elapsed = time.perf_counter() - started
        for listener in listeners:
            listener(elapsed)


CHECKPOINT: Interception[SaveListener] = Interception("checkpoint save")
CHECKPOINT.patch(torch, "save", _around_save)
CHECKPOINT.patch("torch.distributed.checkpoint", "save", _around_save)
CHECKPOINT.patch("torch.distributed.checkpoint", "async_save", _around_save)
CHECKPOINT.patch("transformers.modeling_utils:PreTrainedModel", "save_pretrained", _around_save)
CHECKPOINT.patch("transformers.trainer:Trainer", "_save_checkpoint", _around_save)
