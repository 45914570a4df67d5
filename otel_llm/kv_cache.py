"""KV-cache reuse accounting: the two counters and the sliding-window hit ratio (#16)."""

from __future__ import annotations

import threading
from collections import deque

__all__ = ["KvCacheWindow"]


class KvCacheWindow:
    """Reused / (reused + added) over the last ``size`` cache updates, kept as running sums."""

    def __init__(self, size: int = 64) -> None:
        self._updates: deque[tuple[int, int]] = deque()
        self._size = size
        self._reused = 0
        self._total = 0
        self._lock = threading.Lock()

    def update(self, reused: int, added: int) -> None:
        if reused < 0 or added < 0:
            raise ValueError(f"KV-cache counts must be >= 0, got reused={reused}, added={added}")
        with self._lock:
            self._updates.append((reused, reused + added))
            self._reused += reused
            self._total += reused + added
            if len(self._updates) > self._size:
                old_reused, old_total = self._updates.popleft()
                self._reused -= old_reused
                self._total -= old_total

    def ratio(self) -> float | None:
        """The hit ratio, or None before any update with lookups."""
        with self._lock:
            return self._reused / self._total if self._total else None
