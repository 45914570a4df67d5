"""The one way otel_llm wraps a torch or transformers function while a probe listens to its calls.

An :class:`Interception` is a family of calls (cross-entropy, attention, KV-cache
updates) and the listeners that want them; each :class:`Patch` puts one wrapper
into one slot (an attribute of a module or class, or a key of a module's
globals) that delivers the slot's calls to that family.

* Reference-counted: a patch is installed by its first user and restored by its
  last, however many sessions and models share it.
* The wrapper calls the function that occupied the slot when the wrapper went in,
  never one captured at import: a profiler's, a shim's or the script's own
  wrapper installed before ours stays in the chain.
* Restoring puts that function back only while the slot still holds our wrapper.
  If someone wrapped over ours meanwhile, ours stays inside their chain as a
  pass-through (no listeners, no cost beyond one attribute read), and the next
  install finds it there instead of stacking a second one.
* A slot of a module not imported yet (``transformers.cache_utils``) is patched
  when the module is imported.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, MutableMapping
from types import ModuleType
from typing import Any, Generic, TypeVar

from otel_llm.runtime.log_once import once

__all__ = ["Around", "Interception", "Patch"]

_logger = logging.getLogger(__name__)
_lock = threading.RLock()

L = TypeVar("L")

Around = Callable[[Callable[..., Any], tuple[Any, ...], tuple[Any, ...], dict[str, Any]], Any]
"""``around(call, listeners, args, kwargs)``: run ``call(*args, **kwargs)``, tell the listeners, return its result."""


class Interception(Generic[L]):
    """Listeners of one family of calls, and the patches installed while any listens."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.listeners: tuple[L, ...] = ()
        """Replaced, never mutated: a call in flight iterates over a consistent tuple."""
        self._while_listened: list[Patch] = []

    def patch(self, owner: object | str, attribute: str, around: Around, *, on_demand: bool = False) -> Patch:
        """A patch of ``owner.attribute`` delivering to these listeners.

        ``owner`` is a module, a class, a globals dict, or ``"module:Class"`` for a
        class of a module that may be imported later. Unless ``on_demand``, the patch
        is installed with the first listener and restored with the last; an
        on-demand patch is acquired and released by its user (one per model).
        """
        patch = Patch(self, owner, attribute, around)
        if not on_demand:
            with _lock:
                self._while_listened.append(patch)
                if self.listeners:
                    patch.acquire()
        return patch

    def add_listener(self, listener: L) -> None:
        with _lock:
            first = not self.listeners
            self.listeners = (*self.listeners, listener)
            if first:
                for patch in self._while_listened:
                    patch.acquire()

    def remove_listener(self, listener: L) -> None:
        """Stop delivering to ``listener`` (bound methods compare by ``==``); unknown ones are ignored."""
        with _lock:
            if listener not in self.listeners:
                return
            self.listeners = tuple(item for item in self.listeners if item != listener)
            if not self.listeners:
                for patch in self._while_listened:
                    patch.release()


class Patch:
    """One wrapper in one slot, installed while :meth:`acquire` calls outnumber :meth:`release` calls."""

    def __init__(self, family: Interception[Any], owner: object | str, attribute: str, around: Around) -> None:
        self._family = family
        self._owner = owner
        self._attribute = attribute
        self._around = around
        self._users = 0
        self._import_hook = False
        self.underlying: Callable[..., Any] | None = None
        """The function the wrapper calls: what occupied the slot when the wrapper went in."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            call = self.underlying
            assert call is not None, "an otel_llm wrapper was called before it was installed"
            listeners = family.listeners
            if not listeners:
                return call(*args, **kwargs)
            return around(call, listeners, args, kwargs)

        self.wrapper = wrapper

    @property
    def installed(self) -> bool:
        return self._users > 0

    def acquire(self) -> None:
        with _lock:
            self._users += 1
            if self._users == 1:
                self._install()

    def release(self) -> None:
        with _lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                self._restore()

    # -- slot access ------------------------------------------------------------
    def _resolve(self) -> object | None:
        """The object holding the slot, or None while its module is not imported."""
        if not isinstance(self._owner, str):
            return self._owner
        module_name, _, class_name = self._owner.partition(":")
        module = sys.modules.get(module_name)
        if module is None:
            if not self._import_hook:
                import wrapt

                wrapt.register_post_import_hook(self._on_import, module_name)
                self._import_hook = True
            return None
        return getattr(module, class_name, None) if class_name else module

    def _read(self, owner: object) -> Any:
        if isinstance(owner, MutableMapping):
            return owner.get(self._attribute)
        if isinstance(owner, type):  # the class's own attribute, never one it inherits
            return vars(owner).get(self._attribute)
        return getattr(owner, self._attribute, None)

    def _write(self, owner: object, value: Any) -> None:
        if isinstance(owner, MutableMapping):
            owner[self._attribute] = value
        else:
            setattr(owner, self._attribute, value)

    def _on_import(self, module: ModuleType) -> None:
        with _lock:
            if self._users:
                self._install()

    def _install(self) -> None:
        owner = self._resolve()
        if owner is None:
            return
        current = self._read(owner)
        if not callable(current):
            once(_logger, logging.INFO, ("no slot", self._family.name, self._attribute),
                 "otel_llm: %s has no function %s to wrap; its %s calls are not seen", _describe(owner),
                 self._attribute, self._family.name)
            return
        if self._in_chain(current):
            return
        self.underlying = current
        functools.update_wrapper(self.wrapper, current)  # name, docstring, __wrapped__ of what it wraps
        self._write(owner, self.wrapper)

    def _restore(self) -> None:
        owner = self._resolve() if not isinstance(self._owner, str) or _imported(self._owner) else None
        if owner is not None and self._read(owner) is self.wrapper and self.underlying is not None:
            self._write(owner, self.underlying)

    def _in_chain(self, function: Any) -> bool:
        """Whether our wrapper is ``function`` or is wrapped (``__wrapped__``) by it."""
        seen = 0
        while function is not None and seen < 64:
            if function is self.wrapper:
                return True
            function, seen = getattr(function, "__wrapped__", None), seen + 1
        return False


def _imported(owner: str) -> bool:
    return owner.partition(":")[0] in sys.modules


def _describe(owner: object) -> str:
    if isinstance(owner, MutableMapping):
        return f"module {owner.get('__name__', '?')}"
    return getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or type(owner).__name__

