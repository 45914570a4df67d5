"""The Prometheus HTTP endpoint: one server per (host, port) in the process, shared and refcounted.

prometheus_client's handler negotiates OpenMetrics text when the scraper asks
for it (``Accept: application/openmetrics-text``) and serves the classic text
format otherwise.
"""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["PortInUse", "acquire", "release"]

_logger = logging.getLogger(__name__)
_lock = threading.Lock()


@dataclass
class _Server:
    httpd: Any
    users: int


_servers: dict[tuple[str, int], _Server] = {}


class PortInUse(OSError):
    """Another process already listens on the endpoint's port."""


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

    Raises :class:`PortInUse` when another process holds the port.
    """
    from prometheus_client import start_http_server

    with _lock:
        server = _servers.get((host, port))
        if server is not None:
            server.users += 1
            return port
        try:
            httpd, _thread = start_http_server(port, addr=host)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if not _listening_here(port):
                raise PortInUse(exc.errno, f"port {port} on {host} is in use by another process") from None
            _logger.info("otel_llm: port %d is already served by this process; sharing it", port)
            httpd = None
        bound = httpd.server_address[1] if httpd is not None else port
        _servers[(host, bound)] = _Server(httpd, 1)
        return bound


def release(host: str, port: int) -> None:
    """Drop one user of host:port; the last one stops the server."""
    with _lock:
        server = _servers.get((host, port))
        if server is None:
            return
        server.users -= 1
        if server.users > 0:
            return
        del _servers[(host, port)]
    if server.httpd is not None:
        server.httpd.shutdown()
        server.httpd.server_close()
