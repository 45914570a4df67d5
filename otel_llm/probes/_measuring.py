"""The numeric context every probe statistic is computed in: no autograd, no autocast.

Hooks run inside the caller's regions: under ``torch.autocast`` a float32
matmul in a statistic would silently run in bf16/fp16 and the signal would
drift from its definition. Every probe computes inside :func:`measuring`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["measuring"]

_AUTOCAST_DEVICES = tuple(device for device in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "privateuseone")
                          if torch.amp.is_autocast_available(device))


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """No graph recorded and autocast off on every device type where the caller enabled it."""
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
