"""Publish the last steps when the job is stopped with SIGTERM.

Schedulers stop jobs with SIGTERM (Slurm, Kubernetes, torchrun's agent), and
Python's default disposition for it kills the process without running atexit
handlers, so everything since the last periodic OTLP export — up to a minute of
steps at the default interval — never reaches the collector.

:func:`install_sigterm_handler` replaces the default disposition, and only that:
when the process (or a framework) already handles SIGTERM, or when called off
the main thread, nothing changes. On SIGTERM the handler runs the telemetry
shutdown on a helper thread and waits for it at most ``timeout`` seconds, then
restores the default disposition and sends SIGTERM to the process again, so it
still dies "killed by SIGTERM" as it would have without otel_llm.

Python runs the handler on the main thread between two bytecodes, possibly in
the middle of otel_llm's own step bookkeeping or an SDK call, with their locks
held: a shutdown then would wait on those locks for the whole timeout and lose
the last step. So when the signal lands inside otel_llm or OpenTelemetry code,
the handler sends it again a few milliseconds later, once the main thread is out
of it. A second SIGTERM while the shutdown runs skips the rest of the wait.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

__all__ = ["install_sigterm_handler"]

RETRY_SECONDS = 0.005
"""Delay before a signal that landed inside telemetry code is sent again."""
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
"""otel_llm's own folder (this module lives one level below it)."""
_OPENTELEMETRY_DIR = f"{os.sep}opentelemetry{os.sep}"

_action: Callable[[], object] | None = None
_timeout = 0.0
_first_signal: float | None = None
_shutting_down = False


def install_sigterm_handler(action: Callable[[], object], timeout: float) -> bool:
    """Run ``action`` (bounded by ``timeout`` s) before SIGTERM's default kill; True if the handler is in place.

    Installs only over the default disposition and from the main thread; a
    second call keeps the handler and takes the longer timeout.
    """
    global _action, _timeout
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        if current is not signal.SIG_DFL:
            return False
        signal.signal(signal.SIGTERM, _on_sigterm)
    _action = action
    _timeout = max(_timeout, timeout)
    return True


def _inside_telemetry(frame: FrameType | None) -> bool:
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_PACKAGE_DIR) or _OPENTELEMETRY_DIR in filename:
            return True
        frame = frame.f_back
    return False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _first_signal, _shutting_down
    now = time.monotonic()
    if _first_signal is None:
        _first_signal = now
    remaining = _timeout - (now - _first_signal)
    if _action is not None and not _shutting_down and remaining > 0:
        if _inside_telemetry(frame):
            retry = threading.Timer(RETRY_SECONDS, os.kill, (os.getpid(), signal.SIGTERM))
            retry.daemon = True
            retry.start()
            return
        _shutting_down = True
        worker = threading.Thread(target=_action, name="otel_llm-sigterm-shutdown", daemon=True)
        worker.start()
        worker.join(remaining)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
