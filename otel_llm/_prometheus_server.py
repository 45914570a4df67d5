"""The Prometheus HTTP endpoint: one per (host, port), owned by one otel_llm session.

The server itself is :mod:`otel_llm._scrape_server`. Two otel_llm sessions
never share an endpoint: their readers would both emit ``target_info`` and the
same families, an invalid exposition.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Any

from otel_llm import _scrape_server

__all__ = ["PortInUse", "acquire", "release"]

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_servers: dict[tuple[str, int], Any] = {}
"""(host, port) -> the server otel_llm started there, or None when this process already listened."""


class PortInUse(OSError):
    """The endpoint's port is taken (by another process or another otel_llm session)."""


def _listening_here(port: int) -> bool:
    """True when this very process already listens on ``port`` (e.g. the SDK's own Prometheus reader)."""
    try:
        import psutil

        return any(conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN
                   for conn in psutil.Process().net_connections(kind="tcp"))
    except Exception:  # noqa: BLE001 - psutil missing or not permitted: assume it is not ours
        return False


def acquire(host: str, port: int) -> int:
    """Serve the default prometheus_client registry on host:port; return the bound port.

    A port this process already listens on outside otel_llm (the SDK's own
    Prometheus reader serves the same registry) is shared. Raises
    :class:`PortInUse` when another process or another otel_llm session holds it.
    """
    with _lock:
        if (host, port) in _servers:
            raise PortInUse(errno.EADDRINUSE, f"port {port} on {host} is served by another otel_llm session")
        try:
            httpd = _scrape_server.start(host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if not _listening_here(port):
                raise PortInUse(exc.errno, f"port {port} on {host} is in use by another process") from None
            _logger.info("otel_llm: port %d is already served by this process; sharing it", port)
            httpd = None
        bound = httpd.server_address[1] if httpd is not None else port
        _servers[(host, bound)] = httpd
        return bound


def release(host: str, port: int) -> None:
    """Stop the endpoint started by :func:`acquire` (a shared foreign listener is left alone)."""
    with _lock:
        httpd = _servers.pop((host, port), None)
    if httpd is not None:
        httpd.shutdown()
        httpd.server_close()
