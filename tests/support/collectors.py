"""Collectors that misbehave on purpose, TLS receivers and a wire tap, all on 127.0.0.1.

* :class:`Blackhole` accepts connections and never answers.
* :class:`ReceiverProcess` receives OTLP in a separate process.
* :class:`GrpcCollector` is an OTLP/gRPC receiver that can serve TLS, listen on
  a fixed port and go down and up again while keeping what it received.
* :class:`HttpsMetricsReceiver` is the OTLP/HTTP receiver behind TLS.
* :class:`TcpRelay` forwards a port, keeps the bytes clients sent (what
  actually went over the wire) and can be cut and restored in an instant.
* :func:`make_certificates` writes a CA, a server and a client certificate with
  the ``openssl`` command line tool.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc

from tests.support.receivers import GrpcMetricsReceiver, HttpMetricsReceiver, _HttpServer, _Servicer


def otlp_env(monkeypatch: pytest.MonkeyPatch, protocol: str, port: int, *, tls: bool = False) -> None:
    """Point the OTLP metric exporter at 127.0.0.1:port (plaintext unless ``tls``), 1 s export timeout."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", protocol)
    path = "/v1/metrics" if protocol == "http/protobuf" else ""
    scheme = "https" if tls else "http"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"{scheme}://127.0.0.1:{port}{path}")
    if not tls:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_INSECURE", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "1")


class Blackhole:
    """A loopback TCP server that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted.append(conn)  # held open, never read from or written to

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self.accepted:
            conn.close()
        self._sock.close()


class ReceiverProcess:
    """An OTLP receiver of tests/support/receivers.py in a process of its own, so receiving costs this one nothing.

    A collector runs elsewhere in real life; in-process, its request handling
    would compete with the training thread for the GIL.
    """

    _CODE = ("import sys\n"
             "from tests.support.receivers import GrpcMetricsReceiver, HttpMetricsReceiver\n"
             "receiver_class = GrpcMetricsReceiver if sys.argv[1] == 'grpc' else HttpMetricsReceiver\n"
             "with receiver_class() as receiver:\n"
             "    print(receiver.port, flush=True)\n"
             "    for _ in sys.stdin:\n"
             "        print(len(receiver.requests), flush=True)\n")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol

    def __enter__(self) -> ReceiverProcess:
        self._proc = subprocess.Popen([sys.executable, "-c", self._CODE, self.protocol], cwd=Path(__file__).parents[2],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = int(self._proc.stdout.readline())
        return self

    def requests_received(self) -> int:
        self._proc.stdin.write("count\n")
        self._proc.stdin.flush()
        return int(self._proc.stdout.readline())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._proc.stdout.close()


class GrpcCollector(GrpcMetricsReceiver):
    """OTLP/gRPC receiver that can use TLS, a fixed port, and :meth:`stop` / :meth:`start` repeatedly.

    What it received survives a restart, so a test can take a collector down
    and bring it back on the same port while the exporter keeps its endpoint.
    """

    def __init__(self, port: int = 0, credentials: grpc.ServerCredentials | None = None) -> None:
        super().__init__()
        self.port = port
        self._credentials = credentials

    @property
    def url(self) -> str:
        return f"{'https' if self._credentials else 'http'}://{self.endpoint}"

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Servicer(self), server)
        address = f"127.0.0.1:{self.port}"
        bound = (server.add_secure_port(address, self._credentials) if self._credentials
                 else server.add_insecure_port(address))
        if not bound:
            raise OSError(f"cannot listen on {address}")
        self.port = bound
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> GrpcCollector:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _HttpsServer(_HttpServer):
    """The receiver's HTTP server with TLS, handshaking in the request thread (a stuck client blocks no one)."""

    def __init__(self, store: HttpsMetricsReceiver, context: ssl.SSLContext) -> None:
        super().__init__(store)
        self.context = context

    def finish_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        request.settimeout(5)
        try:
            secured = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):  # a client without the right certificates: nothing to serve
            return
        try:
            super().finish_request(secured, client_address)  # type: ignore[arg-type]
        finally:
            secured.close()


class HttpsMetricsReceiver(HttpMetricsReceiver):
    """OTLP/HTTP receiver over TLS; with ``client_ca`` it requires a client certificate signed by it."""

    def __init__(self, certificate: Path, key: Path, client_ca: Path | None = None) -> None:
        super().__init__()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certificate, key)
        if client_ca is not None:
            self.context.load_verify_locations(client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1/metrics"

    def __enter__(self) -> HttpsMetricsReceiver:
        self._server = _HttpsServer(self, self.context)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self


class TcpRelay:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream``; keeps what clients sent; can be cut and restored.

    :meth:`down` closes the port and every connection through it, so the
    exporter meets a refused connection at once; :meth:`up` listens on the same
    port again. ``sent`` holds, per connection, the first 64 KiB clients sent,
    to check what actually went over the wire.
    """

    KEEP = 64 * 1024

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.sent: list[bytearray] = []
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        for sock in [*sockets, *([listener] if listener else [])]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    close = down

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            kept = bytearray()
            with self._lock:
                if self._listener is not listener:  # cut meanwhile: this connection must not live on
                    client.close()
                    upstream.close()
                    return
                self.sent.append(kept)
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, kept), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, kept: bytearray | None) -> None:
        try:
            while chunk := source.recv(65536):
                if kept is not None and len(kept) < self.KEEP:
                    kept += chunk[: self.KEEP - len(kept)]
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def client_bytes(self) -> bytes:
        """Everything clients sent, all connections together."""
        return b"".join(bytes(kept) for kept in list(self.sent))


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost and a client certificate, both CA-signed."""

    ca: Path
    server_certificate: Path
    server_key: Path
    client_certificate: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _signed(directory: Path, name: str, serial: int, extensions: str, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    key, request, certificate = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    extension_file = directory / f"{name}.ext"
    extension_file.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", request, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-set_serial", str(serial),
             "-days", "2", "-extfile", extension_file, "-out", certificate)
    return certificate, key


def make_certificates(directory: Path) -> Certificates:
    """A throwaway CA and the certificates it signed, written into ``directory``."""
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=otel-llm test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    server = _signed(directory, "server", 2, "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                     "subjectAltName=IP:127.0.0.1,DNS:localhost\n", ca, ca_key)
    client = _signed(directory, "client", 3, "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n", ca, ca_key)
    return Certificates(ca, *server, *client)
