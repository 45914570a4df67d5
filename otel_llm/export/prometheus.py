"""The Prometheus HTTP endpoint: one per (host, port), owned by one otel_llm session.

Two otel_llm sessions never share an endpoint: their readers would both emit
``target_info`` and the same families, an invalid exposition.

The server is prometheus_client's WSGI app, which negotiates the format
(OpenMetrics text when the scraper sends ``Accept: application/openmetrics-text``,
classic text 0.0.4 otherwise), with two changes to what ``start_http_server``
would give:

* a listen backlog of :data:`LISTEN_BACKLOG` instead of socketserver's 5. With 5,
  a burst of scrapers (Prometheus replicas, an agent restart, a human with
  ``watch curl``) overflows the accept queue and every dropped connection waits
  for the client's SYN retransmission: scrapes of 1-5 s instead of milliseconds;
* one collection at a time, shared by the scrapes that wait for it
  (:class:`SharedScrapes`).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["LISTEN_BACKLOG", "PortInUse", "SharedScrapes", "acquire", "release"]

LISTEN_BACKLOG = 128
"""Connections the kernel queues before the server accepts them (``listen()`` backlog)."""

_Response = tuple[str, list[tuple[str, str]], bytes]
_REPRESENTATION = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "HTTP_ACCEPT", "HTTP_ACCEPT_ENCODING")
"""Request fields that decide the response body: scrapes equal in all of them can share one."""


class _Flight:
    """One collection and the scrapes waiting for its response."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: _Response | None = None


class SharedScrapes:
    """WSGI app: one collection at a time; scrapes that arrive while one waits for its turn share it.

    Serialised, because the OpenTelemetry Prometheus reader hands each
    collection to the scrape through a queue: two scrapes collecting at once can
    take each other's data, so one answers every series twice and the other
    none. Shared, because every collection costs the SDK's collect lock (which
    the OTLP reader needs too) and GIL time the training loop needs, so N
    simultaneous scrapers should not cost N collections. A scrape joins only a
    collection that has not started yet, so every response is collected after
    its request arrived.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._turn = threading.Lock()
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, ...], _Flight] = {}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        key = tuple(str(environ.get(name, "")) for name in _REPRESENTATION)
        with self._lock:
            flight = self._waiting.get(key)
            leading = flight is None
            if flight is None:
                flight = self._waiting[key] = _Flight()
        if leading:
            with self._turn:
                with self._lock:
                    del self._waiting[key]  # scrapes arriving from now on wait for the next collection
                try:
                    flight.response = self._collect(environ)
                finally:
                    flight.done.set()
        else:
            flight.done.wait()
        response = flight.response
        if response is None:  # the shared collection raised (and answered its own scrape with 500)
            with self._turn:
                response = self._collect(environ)
        status, headers, body = response
        start_response(status, headers)
        return [body]

    def _collect(self, environ: dict[str, Any]) -> _Response:
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            started[:] = [status, headers]

        body = b"".join(self._app(environ, start_response))
        return started[0], started[1], body


class _QuietHandler(WSGIRequestHandler):
    """No access-log line on stderr per scrape."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
        pass


def _start(host: str, port: int) -> WSGIServer:
    """Serve prometheus_client's default registry on host:port from daemon threads.

    Raises OSError when the address cannot be bound (``errno.EADDRINUSE`` for a taken port).
    """
    from prometheus_client import REGISTRY, make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("ScrapeServer", (ThreadingWSGIServer,),
                        {"address_family": family, "request_queue_size": LISTEN_BACKLOG})
    httpd: WSGIServer = make_server(str(sockaddr[0]), port, SharedScrapes(make_wsgi_app(REGISTRY)), server_class,
                                    handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name=f"otel_llm-prometheus-{httpd.server_address[1]}",
                     daemon=True).start()
    return httpd

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
            httpd = _start(host, port)
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
