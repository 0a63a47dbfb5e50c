"""`/healthz` and `/metrics` over HTTP (the `http` section of the config).

A small WSGI app on wsgiref: two GET routes need no web framework, and threads
keep a slow scraper off the control loop. It only reads: the state and the
counters it is given are safe to read from here.

No client delays another. A connection's request head (up to its blank line, at
most `MAX_HEAD_BYTES`, else 431) is read without a thread, by the selector that
accepts, and must be whole within `timeout_s` of the accept: a deadline, not an
idle cut-off, so a client trickling a byte at a time is closed as surely as a
silent one. Past `max_waiting` such sockets the oldest is closed, so a flood of
them never shuts a new client out. Only then is it served on a daemon thread of
its own, at most `max_clients` at once (one more is closed at once rather than
queued), whose answer must be written within `timeout_s` too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Reading = Callable[[], dict[str, float]]  # metric name -> value, read at scrape time


@dataclass
class Metrics:
    """The agent's metrics, in a registry of their own (no process-wide global). Counters
    and gauges are read from the live state when scraped; commit latency is observed."""

    read_counters: Reading
    read_gauges: Reading
    read_stages: Callable[[], dict[str, int]]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.commit_seconds = Histogram(
            "edge_agent_commit_seconds",
            "Time to commit one transaction to the event log",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.registry.register(_Live(self))


class _Live(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for name, value in self._metrics.read_counters().items():
            yield CounterMetricFamily(f"edge_agent_{name}", name.replace("_", " "), value=value)
        for name, value in self._metrics.read_gauges().items():
            yield GaugeMetricFamily(f"edge_agent_{name}", name.replace("_", " "), value=value)
        stages = GaugeMetricFamily("edge_agent_work_items", "Live work items per stage", labels=["stage"])
        for stage, count in self._metrics.read_stages().items():
            stages.add_metric([stage], count)
        yield stages


MAX_CLIENTS = 16  # connections served at once, each on a thread
MAX_WAITING = 64  # connections waiting for their request, each a file descriptor and its head so far
MAX_HEAD_BYTES = 8192  # a request line and headers; GET /healthz or /metrics needs far less
TIMEOUT_S = 5.0  # for a request head to arrive from the accept, and for the answer to be written

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")  # the blank line; http.server takes bare LF lines too
_TOO_LARGE = b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n"


class _Handler(WSGIRequestHandler):
    """Serves one request from its head, already read, into a buffer that is sent after with a
    deadline: wsgiref's own writes would each wait the whole socket timeout afresh."""

    def __init__(self, head: bytes, connection: socket.socket, address: Any, server: WSGIServer) -> None:
        self._head = head
        self._written = io.BytesIO()
        self.answer = b""
        super().__init__(connection, address, server)  # serves the request

    def setup(self) -> None:
        self.rfile = io.BytesIO(self._head)
        self.wfile = self._written

    def finish(self) -> None:
        self.answer = self._written.getvalue()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


@dataclass
class _Waiting:
    """A connection whose request head is still arriving."""

    until: float  # the deadline, from the accept
    head: bytearray = field(default_factory=bytearray)
    refused: bool = False  # its head is over the bound: answered 431, the rest is thrown away


class _Server(WSGIServer):
    # The kernel's queue of connections not yet accepted; at wsgiref's 5, a burst of them
    # has the kernel drop new ones, which their clients try again only a second later.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http: connection from %s ended badly", client_address, exc_info=True)


class HealthServer:
    """Serves `/healthz` (200, or 503 with the reasons) and `/metrics` (Prometheus)."""

    def __init__(
        self,
        bind: str,
        port: int,
        check: Callable[[], list[str]],
        metrics: Metrics,
        *,
        max_clients: int = MAX_CLIENTS,
        max_waiting: int = MAX_WAITING,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._check = check
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._server = make_server(bind, port, self._app, server_class=_Server, handler_class=_Handler)
        self.port = self._server.server_port
        self._slots = threading.BoundedSemaphore(max_clients)
        self._max_waiting = max_waiting
        self._timeout_s = timeout_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="http", daemon=True)

    def _app(self, environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start)  # type: ignore[no-any-return]
        if path == "/healthz":
            problems = self._check()
            status = "503 Service Unavailable" if problems else "200 OK"
            body = orjson.dumps({"status": "unhealthy" if problems else "ok", "reasons": problems})
            start(status, [("Content-Type", "application/json")])
            return [body]
        start("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /healthz or /metrics\n"]

    def _accept(self) -> None:
        """Accept connections, read each one's request head, and hand it to a thread once whole."""
        waiting: dict[socket.socket, _Waiting] = {}  # oldest first
        with selectors.DefaultSelector() as selector:
            selector.register(self._server.socket, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=0.5):
                    if key.fileobj is self._server.socket:
                        self._arrived(selector, waiting)
                    else:
                        connection = key.fileobj
                        assert isinstance(connection, socket.socket)
                        head = self._read(connection, waiting[connection])
                        if head is not None:
                            selector.unregister(connection)
                            del waiting[connection]
                            if head:
                                self._serve(connection, head)
                            else:
                                connection.close()
                now = time.monotonic()
                for connection in [c for c, w in waiting.items() if w.until <= now]:
                    selector.unregister(connection)
                    del waiting[connection]
                    connection.close()
            for connection in waiting:
                connection.close()

    def _arrived(self, selector: selectors.BaseSelector, waiting: dict[socket.socket, _Waiting]) -> None:
        try:
            connection, _ = self._server.socket.accept()
        except OSError:
            return  # gone before it was taken, or out of file descriptors: the next one may do
        if len(waiting) >= self._max_waiting:
            oldest = next(iter(waiting))
            selector.unregister(oldest)
            del waiting[oldest]
            oldest.close()
        connection.setblocking(False)
        waiting[connection] = _Waiting(time.monotonic() + self._timeout_s)
        selector.register(connection, selectors.EVENT_READ)

    @staticmethod
    def _read(connection: socket.socket, waiting: _Waiting) -> bytes | None:
        """What has arrived: None while the head is incomplete, the head once whole, b"" for a
        connection to close (gone)."""
        try:
            data = connection.recv(4096 if waiting.refused else MAX_HEAD_BYTES + 1 - len(waiting.head))
        except BlockingIOError:
            return None
        except OSError:
            return b""
        if not data:
            return b""  # gone before its request was whole
        if waiting.refused:
            return None  # read only so that closing does not reset the connection and lose the 431
        waiting.head += data
        end = _END_OF_HEAD.search(waiting.head)
        if end is not None:
            return bytes(waiting.head[: end.end()])  # a body, if any, is not read: no route takes one
        if len(waiting.head) > MAX_HEAD_BYTES:
            with contextlib.suppress(OSError):  # small enough for any empty socket buffer; else it is lost
                connection.send(_TOO_LARGE)
                connection.shutdown(socket.SHUT_WR)
            waiting.refused = True  # kept until the client closes, or the deadline
        return None

    def _serve(self, connection: socket.socket, head: bytes) -> None:
        if not self._slots.acquire(blocking=False):
            connection.close()  # all threads busy: closed at once, not queued behind them
            return
        try:
            thread = threading.Thread(target=self._handle, args=(connection, head), name="http-client", daemon=True)
            thread.start()
        except RuntimeError:  # the process may start no more threads: this client, not the server, goes
            self._slots.release()
            connection.close()

    def _handle(self, connection: socket.socket, head: bytes) -> None:
        try:
            address = connection.getpeername()
            try:
                answer = _Handler(head, connection, address, self._server).answer
                # One send, so the timeout bounds the whole answer: a client that reads it
                # slowly (or not at all) holds its thread this long, and no longer.
                connection.settimeout(self._timeout_s)
                connection.sendall(answer)
            except Exception:
                self._server.handle_error(connection, address)
            finally:
                self._server.shutdown_request(connection)
        except OSError:
            connection.close()  # the client left before it was served
        finally:
            self._slots.release()

    def start(self) -> None:
        self._thread.start()
        host = self._server.server_address[0]
        log.info("health on http://%s:%d/healthz, metrics on /metrics", host, self.port)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._server.server_close()
