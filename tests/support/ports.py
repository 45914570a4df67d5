"""A port another process listens on: what a clash looks like (one this process holds would be shared)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["held_by_another_process"]

_HOLDER = """
import socket, sys
while True:
    s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()
    port = s.getsockname()[1]
    probe = socket.socket()
    try:
        if sys.argv[1] == '1':
            probe.bind(('127.0.0.1', port + 1))
        break
    except OSError:
        s.close()
    finally:
        probe.close()
print(port, flush=True)
sys.stdin.read()
"""


@contextmanager
def held_by_another_process(next_free: bool = False) -> Iterator[int]:
    """A loopback port a child process listens on until the block ends; ``next_free``: port + 1 was free."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, "1" if next_free else "0"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        yield int(holder.stdout.readline())
    finally:
        holder.stdin.close()
        try:
            holder.wait(10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(5)
