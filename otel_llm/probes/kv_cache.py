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
counted. The wrapper is installed when ``transformers.cache_utils`` is imported
(or at once if it already is) and removed with the last listener.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from otel_llm.probes.base import log_failure

__all__ = ["KvCacheListener", "add_listener", "remove_listener"]

_logger = logging.getLogger(__name__)

KvCacheListener = Callable[[int, int], None]
"""Called with (reused, added) K/V token entries of one layer update."""

_MODULE = "transformers.cache_utils"
_listeners: list[KvCacheListener] = []
_lock = threading.Lock()
_patched: tuple[type, Callable[..., Any]] | None = None
_import_hook = False
_warned: set[str] = set()


def _warn_once(kind: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        _logger.info("otel_llm: %s is not a KV cache otel_llm knows; its updates are not counted", kind)


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
            _warn_once(type(cache).__name__)
            return None
        layers = cache.layers
        stored = 0
        if layer_idx < len(layers):  # a lazily grown DynamicCache creates the layer in this update
            layer = layers[layer_idx]
            reader = readers.get(type(layer))
            stored = reader(layer) if reader is not None else None
            if stored is None:
                _warn_once(f"{type(cache).__name__} layer {type(layer).__name__}")
                return None
        rows = key_states.shape[0]
        return stored * rows, key_states.shape[-2] * rows

    return count


def _patch(module: ModuleType) -> None:
    """Wrap ``Cache.update`` once (callers hold the lock)."""
    global _patched
    if _patched is not None:
        return
    cache_class = getattr(module, "Cache", None)
    original = getattr(cache_class, "__dict__", {}).get("update")
    if original is None:
        _logger.info("otel_llm: this transformers version has no Cache.update; llm.kv_cache.* come only from "
                     "record_kv_cache()")
        return
    count = _counter(module)

    @functools.wraps(original)
    def update(self: Any, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> Any:
        listeners = _listeners
        if not listeners or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return original(self, key_states, value_states, layer_idx, *args, **kwargs)
        try:
            counts = count(self, key_states, layer_idx)
        except Exception:  # noqa: BLE001 - never raise into generation
            log_failure("kv_cache")
            counts = None
        result = original(self, key_states, value_states, layer_idx, *args, **kwargs)
        if counts is not None:
            try:
                for listener in listeners:
                    listener(*counts)
            except Exception:  # noqa: BLE001
                log_failure("kv_cache")
        return result

    cache_class.update = update
    _patched = (cache_class, original)


def _on_import(module: ModuleType) -> None:
    with _lock:
        if _listeners:
            _patch(module)


def add_listener(listener: KvCacheListener) -> None:
    """Deliver every counted cache update to ``listener``; wraps ``Cache.update`` now or when it is imported."""
    global _listeners, _import_hook
    with _lock:
        _listeners = [*_listeners, listener]
        module = sys.modules.get(_MODULE)
        if module is not None:
            _patch(module)
            return
        if not _import_hook:
            import wrapt

            wrapt.register_post_import_hook(_on_import, _MODULE)
            _import_hook = True


def remove_listener(listener: KvCacheListener) -> None:
    """Stop delivering to ``listener``; the last removal restores ``Cache.update``."""
    global _listeners, _patched
    with _lock:
        _listeners = [item for item in _listeners if item != listener]  # bound methods compare by ==
        if not _listeners and _patched is not None:
            cache_class, original = _patched
            cache_class.update = original
            _patched = None
