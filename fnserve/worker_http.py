"""`fnserve worker --metrics-port`: /metrics, /stats and /healthz of a worker, nothing else.

A plain http.server in a thread of its own: a worker has no gunicorn, and a scrape
must not wait for the job the worker is running.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .service import Service

log = logging.getLogger("fnserve.worker")

METRICS_ROUTES = ("/metrics", "/stats", "/healthz")
HEALTHY_WITHIN = 60.0  # /healthz: 503 when Redis has not answered a heartbeat for this long


def _handler(service: Service, last_contact: Callable[[], float]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(service.metrics), CONTENT_TYPE_LATEST)
            elif path == "/stats":
                self._json(200, service.stats.snapshot())
            elif path == "/healthz":
                if service.draining:
                    self._json(503, {"status": "draining"})
                elif time.monotonic() - last_contact() > HEALTHY_WITHIN:
                    self._json(503, {"status": "redis unreachable"})
                else:
                    self._json(200, {"status": "ok"})
            else:
                self._json(404, {"error": "not found", "code": "not_found"})

        def _json(self, status: int, body: Any) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes are not worth a log line each

    return Handler


def serve_metrics(service: Service, last_contact: Callable[[], float], host: str,
                  port: int) -> ThreadingHTTPServer:
    """Serve in a daemon thread; `last_contact()`: when Redis last answered the worker."""
    server = ThreadingHTTPServer((host, port), _handler(service, last_contact))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fnserve-worker-metrics",
                     daemon=True).start()
    log.info("worker metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server
