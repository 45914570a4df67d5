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
  (:class:`SharedScrapes`);
* no local client can take the training process's file descriptors or threads:
  a connection that stays silent for :data:`CONNECTION_TIMEOUT` is closed, at
  most :data:`MAX_CONNECTIONS` are served at once, and one past that is
  answered 503 and closed at once (a flood of idle connections used to hold a
  thread and a descriptor each until ``torch.save`` failed with "Too many open
  files");
* a stop takes at most :data:`POLL_INTERVAL` (socketserver's default of 0.5 s
  alone exceeded short ``shutdown_timeout`` bounds).

:func:`serve` is the entry point: it picks the rank's port and, when the
endpoint cannot be served, says why (port or host) and which readers are left.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.exposition import ThreadingWSGIServer

from otel_llm.config import MAX_PORT
from otel_llm.runtime.log_once import once

__all__ = ["CONNECTION_TIMEOUT", "LISTEN_BACKLOG", "MAX_CONNECTIONS", "POLL_INTERVAL", "PortInUse", "SharedScrapes",
           "acquire", "address", "release", "serve"]

LISTEN_BACKLOG = 128
"""Connections the kernel queues before the server accepts them (``listen()`` backlog)."""
CONNECTION_TIMEOUT = 5.0
"""Seconds a connection may stay silent, reading the request or taking the response, before it is closed."""
MAX_CONNECTIONS = 64
"""Connections served at once (50 simultaneous scrapers fit); the next is answered 503 and closed."""
POLL_INTERVAL = 0.05
"""How often the accept loop looks for a stop request: the most a release waits for it."""
LOOPBACK = "127.0.0.1"
_REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"

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


class _DebugStream:
    """The handler's stderr: a client that went silent or away is routine, not a traceback on the job's stderr."""

    def write(self, text: str) -> None:
        if text.strip():
            _logger.debug("otel_llm scrape server: %s", text.rstrip())

    def flush(self) -> None:
        pass


class _QuietHandler(WSGIRequestHandler):
    """No access-log line per scrape, and a timeout on every read and write of the connection."""

    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
        pass

    def get_stderr(self) -> Any:
        return _DebugStream()


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most :data:`MAX_CONNECTIONS` of them; the next is refused at once."""

    request_queue_size = LISTEN_BACKLOG

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        _logger.debug("otel_llm: scrape connection from %s failed", client_address, exc_info=True)

    def _refuse(self, request: socket.socket) -> None:
        host, port = self.server_address[:2]
        once(_logger, logging.WARNING, ("connections", host, port),
             "otel_llm: the Prometheus endpoint on %s has %d connections open; refusing new ones with 503 until "
             "they finish (a silent one is closed after %g s)", address(str(host), int(port)), MAX_CONNECTIONS,
             CONNECTION_TIMEOUT)
        try:
            request.setblocking(False)
            request.send(_REFUSAL)
        except OSError:
            pass
        self.shutdown_request(request)


def _start(host: str, port: int) -> WSGIServer:
    """Serve prometheus_client's default registry on host:port from daemon threads.

    Raises OSError when the address cannot be bound (``errno.EADDRINUSE`` for a taken port).
    """
    from prometheus_client import REGISTRY, make_wsgi_app

    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("ScrapeServer", (_BoundedServer,), {"address_family": family})
    httpd: WSGIServer = make_server(str(sockaddr[0]), port, SharedScrapes(make_wsgi_app(REGISTRY)), server_class,
                                    handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL},
                     name=f"otel_llm-prometheus-{httpd.server_address[1]}", daemon=True).start()
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


def address(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets as URLs and logs write it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_error(exc: OSError) -> bool:
    """The host is the problem: it does not resolve, or it is no address of this machine."""
    return isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def serve(host: str, base_port: int, local_rank: int, left: str) -> tuple[str, int] | None:
    """Serve local rank ``local_rank``'s endpoint (base port + rank); (host, bound port), or None.

    Whatever fails costs this reader alone, with one warning naming the cause,
    the variable to change and what is ``left`` (e.g. "exporting through OTLP only").
    A port past 65535 is replaced by one the OS picks, a host that cannot be
    bound by loopback; both say so with the URL actually served.
    """
    port = base_port + local_rank if base_port else 0
    replaced = port > MAX_PORT
    if replaced:
        _logger.warning("otel_llm: Prometheus base port %d + local rank %d is past %d (OTEL_EXPORTER_PROMETHEUS_PORT); "
                        "using a port the OS picks instead", base_port, local_rank, MAX_PORT)
        port = 0
    try:
        try:
            bound = acquire(host, port)
        except OSError as exc:
            if not _host_error(exc) or host == LOOPBACK:
                raise
            _logger.warning("otel_llm: cannot serve Prometheus on host %r (%s; OTEL_EXPORTER_PROMETHEUS_HOST); "
                            "using host %s instead", host, exc.strerror or exc, LOOPBACK)
            host, replaced = LOOPBACK, True
            bound = acquire(host, port)
    except OSError as exc:
        what = "host" if _host_error(exc) else "port"
        advice = ("Set OTEL_EXPORTER_PROMETHEUS_HOST to an address of this machine." if what == "host" else
                  "Set OTEL_EXPORTER_PROMETHEUS_PORT to a free base port (local rank k uses base + k).")
        _logger.warning("otel_llm: cannot serve Prometheus on %s (%s: %s); %s. %s",
                        address(host, port), what, exc.strerror or exc, left, advice)
        return None
    if replaced:
        _logger.warning("otel_llm: serving Prometheus on http://%s/metrics instead", address(host, bound))
    return host, bound
