"""The torch optimizer inside an optimizer wrapper: the one whose step hooks run.

accelerate's ``AcceleratedOptimizer`` subclasses ``torch.optim.Optimizer`` without
its hook machinery; DeepSpeed's wrappers are not torch optimizers at all. Either
way only the wrapped optimizer's ``step()`` runs the hooks the session relies on.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from otel_llm.runtime.log_once import once

__all__ = ["innermost_optimizer"]

_logger = logging.getLogger(__name__)

_KNOWN = ("accelerate.", "deepspeed.", "lightning.", "pytorch_lightning.", "transformers.")


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The innermost torch optimizer reached through ``.optimizer`` (a few levels), or None.

    A wrapper from a package otel_llm does not know is named once in the log: its
    torch optimizer is then followed as a plain one.
    """
    current, depth = optimizer, 0
    while depth < 4:
        inner = getattr(current, "optimizer", None)
        if not (isinstance(inner, torch.optim.Optimizer) or hasattr(inner, "optimizer")):
            break
        current, depth = inner, depth + 1
    if not isinstance(current, torch.optim.Optimizer):
        return None
    if depth and not type(optimizer).__module__.startswith(_KNOWN):
        once(_logger, logging.INFO, ("optimizer wrapper", type(optimizer).__qualname__),
             "otel_llm: following the torch optimizer %s inside %s.%s (an optimizer wrapper otel_llm does not "
             "know) as a plain one", type(current).__name__, type(optimizer).__module__, type(optimizer).__qualname__)
    return current
