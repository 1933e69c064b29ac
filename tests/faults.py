"""A fault-injecting HTTP proxy on 127.0.0.1 for the S3 endpoint.

moto answers every request correctly; the faults a real object store produces under
load (503 SlowDown, throttling) or misconfiguration (403 AccessDenied) cannot be
produced otherwise, so this proxy forwards requests to moto and replaces some answers.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# (request number, method, path) -> an HTTP status to answer instead, or None to forward.
FaultPolicy = Callable[[int, str, str], int | None]
# (method, path with query, body of the upstream's answer) -> the body to send instead.
BodyFilter = Callable[[str, str, bytes], bytes]

_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    403: ("AccessDenied", "Access Denied"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}


class FaultProxy:
    def __init__(self, upstream: str, policy: FaultPolicy, body_filter: BodyFilter | None = None) -> None:
        target = urlsplit(upstream)
        self.policy = policy
        self.body_filter = body_filter  # tampers with answers that get through (a lying cache or bucket)
        self.requests = 0
        self.faults = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    number = proxy.requests
                status = proxy.policy(number, self.command, self.path)
                if status is not None:
                    with proxy._lock:
                        proxy.faults += 1
                    code, message = _ERRORS[status]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect",)}
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    if proxy.body_filter is not None and response.status == 200:
                        data = proxy.body_filter(self.command, self.path, data)
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
