"""`/healthz` and `/metrics` over HTTP (the `http` section of the config).

A small WSGI app on wsgiref in a thread of its own: two GET routes need no web
framework, and a thread keeps a slow scraper off the control loop. It only
reads: the state and the counters it is given are safe to read from here.
"""

from __future__ import annotations

import logging
import threading
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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class HealthServer:
    """Serves `/healthz` (200, or 503 with the reasons) and `/metrics` (Prometheus)."""

    def __init__(self, bind: str, port: int, check: Callable[[], list[str]], metrics: Metrics) -> None:
        self._check = check
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._server: WSGIServer = make_server(bind, port, self._app, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

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

    def start(self) -> None:
        self._thread.start()
        host = self._server.server_address[0]
        log.info("health on http://%s:%d/healthz, metrics on /metrics", host, self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
