"""Log a message once per key: a lasting failure must not write a line every step.

Process-wide facts (a probe that fails, an unknown cache class, a bad
environment value) are keyed in :data:`once`; an object whose warnings belong
to it alone (a publisher, a View) keeps a :class:`LogOnce` of its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable

__all__ = ["LogOnce", "once"]


class LogOnce:
    """Remembers which keys were logged, so each is logged the first time only."""

    def __init__(self) -> None:
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        """True the first time ``key`` is seen (then never again)."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True

    def __call__(self, logger: logging.Logger, level: int, key: Hashable, message: str, *args: object,
                 exc_info: bool = False) -> bool:
        """Log ``message % args`` at ``level`` if ``key`` is new; True when it was logged."""
        if not self.first(key):
            return False
        logger.log(level, message, *args, exc_info=exc_info)
        return True

    def forget(self) -> None:
        """Log every key again from now on (a fresh process would)."""
        with self._lock:
            self._seen.clear()


once = LogOnce()
"""The process-wide record."""
