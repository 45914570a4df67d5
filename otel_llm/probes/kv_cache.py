"""KV-cache reuse from transformers' Cache objects (#16): each layer update reports reused and added entries.

Every transformers attention layer stores its keys and values through
``Cache.update(key_states, value_states, layer_idx)``, so wrapping that one
method on the class sees generation with any model. Before the update, the
layer's stored entries are the ones the update reuses; ``key_states`` holds the
newly computed ones; both count once per batch row. Known: ``DynamicCache``
and ``StaticCache`` with full-attention or sliding-window layers. Any other
cache or layer class is passed through untouched, with one log line.

Only updates with autograd off are counted: ``generate()`` and inference loops.
transformers also fills a throwaway cache during training forwards, which is
not cache reuse. A static layer keeps its fill level on the device, so it costs
one scalar read per layer update; compiled forwards (``torch.compile``) are not
counted. The patch goes in when ``transformers.cache_utils`` is imported (or at
once if it already is) and comes out with the last listener.

Counts are recorded as they happen, not on sampled steps: generation runs
without optimizer steps.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from otel_llm.probes.base import Probe, log_failure
from otel_llm.probes.interception import Interception
from otel_llm.runtime import fork
from otel_llm.runtime.log_once import once

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["KV_CACHE", "KvCacheListener", "KvCacheProbe"]

_logger = logging.getLogger(__name__)

KvCacheListener = Callable[[int, int], None]
"""Called with (reused, added) K/V token entries of one layer update."""

_MODULE = "transformers.cache_utils"


def _unknown(kind: str) -> None:
    once(_logger, logging.INFO, ("unknown kv cache", kind),
         "otel_llm: %s is not a KV cache otel_llm knows; its updates are not counted", kind)


def _dynamic_stored(layer: Any) -> int | None:
    keys = getattr(layer, "keys", None)
    return keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0


def _static_stored(layer: Any) -> int | None:
    length = getattr(layer, "cumulative_length", None)
    if not isinstance(length, torch.Tensor):
        return None
    return int(length) if layer.is_initialized else 0


def _static_sliding_stored(layer: Any) -> int | None:
    length = getattr(layer, "cumulative_length_int", None)
    return None if length is None else min(length, layer.max_cache_len - 1)


_READERS: dict[str, Callable[[Any], int | None]] = {
    "DynamicLayer": _dynamic_stored,
    "DynamicSlidingWindowLayer": _dynamic_stored,
    "StaticLayer": _static_stored,
    "StaticSlidingWindowLayer": _static_sliding_stored,
}
"""Per known layer class: entries per batch row it stores, which an update reuses (None: unknown layout)."""


def _counter(module: ModuleType) -> Callable[[Any, torch.Tensor, int], tuple[int, int] | None]:
    caches = tuple(getattr(module, name) for name in ("DynamicCache", "StaticCache") if hasattr(module, name))
    readers = {getattr(module, name): reader for name, reader in _READERS.items() if hasattr(module, name)}

    def count(cache: Any, key_states: torch.Tensor, layer_idx: int) -> tuple[int, int] | None:
        if type(cache) not in caches:
            _unknown(type(cache).__name__)
            return None
        layers = cache.layers
        stored = 0
        if layer_idx < len(layers):  # a lazily grown DynamicCache creates the layer in this update
            layer = layers[layer_idx]
            reader = readers.get(type(layer))
            found = reader(layer) if reader is not None else None
            if found is None:
                _unknown(f"{type(cache).__name__} layer {type(layer).__name__}")
                return None
            stored = found
        rows = key_states.shape[0]
        return stored * rows, key_states.shape[-2] * rows

    return count


def _bind_update(cache: Any, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                 **kwargs: Any) -> tuple[Any, torch.Tensor, int]:
    return cache, key_states, layer_idx


_count: Callable[[Any, torch.Tensor, int], tuple[int, int] | None] | None = None


def _around_update(call: Callable[..., Any], listeners: tuple[KvCacheListener, ...], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    global _count
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return call(*args, **kwargs)
    try:
        cache, key_states, layer_idx = _bind_update(*args, **kwargs)
        if _count is None:
            _count = _counter(sys.modules[_MODULE])
        counts = _count(cache, key_states, layer_idx)
    except Exception:  # noqa: BLE001 - never raise into generation
        log_failure("kv_cache")
        counts = None
    result = call(*args, **kwargs)
    if counts is not None:
        try:
            for listener in listeners:
                listener(*counts)
        except Exception:  # noqa: BLE001
            log_failure("kv_cache")
    return result


KV_CACHE: Interception[KvCacheListener] = Interception("kv_cache")
KV_CACHE.patch(f"{_MODULE}:Cache", "update", _around_update)


class KvCacheProbe(Probe):
    """Hands every counted cache update to ``record`` (the publisher's KV-cache counters and window)."""

    name = "kv_cache"

    def __init__(self, config: Config, record: KvCacheListener) -> None:
        super().__init__(config)
        self._record = record

    def start(self, model_known: bool) -> None:
        self.listen(KV_CACHE, self._on_update)

    def _on_update(self, reused: int, added: int) -> None:
        if not fork.forked:
            self._record(reused, added)
