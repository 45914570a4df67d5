"""Whether this process is a fork (a DataLoader worker) of the one that loaded otel_llm.

A forked child never exports: the parent already does, and the fork copied
every lock as it was, so one the parent's exporter thread held mid-collection
stays held in the child forever. Hooks, recording and shutdown read
:data:`forked` and do nothing there.
"""

from __future__ import annotations

import os

__all__ = ["forked"]

forked = False
"""True in a child forked after otel_llm was imported."""


def _after_fork_in_child() -> None:
    global forked
    forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)
