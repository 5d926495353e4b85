"""A tiny threaded JSON-over-HTTP server for the fake clouds (GCE, ARM) in tests/fakes/.

Routes are (method, regex) -> handler(request) -> Response. Every request is logged with its
parsed JSON body, so tests can check exactly what the real SDK clients sent. Listens on
127.0.0.1 on a free port; `start()`/`stop()` run it in a daemon thread.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # parsed JSON, raw text, or None
    params: dict[str, str] = field(default_factory=dict)  # named groups of the route regex

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list -> JSON; str -> text/plain; None -> empty
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


class RestFake:
    """Subclasses register routes in `__init__` with `self.route(method, pattern, handler)`."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.requests: list[Request] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern + r"/?$"), handler))

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RestFake:
        fake = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def log_message(self, *args: Any) -> None:  # quiet
                return

            def _serve(self) -> None:
                fake._dispatch(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def requests_to(self, method: str, pattern: str) -> list[Request]:
        rx = re.compile(pattern)
        with self.lock:
            return [r for r in self.requests if r.method == method and rx.search(r.path)]

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        request = Request(h.command, parts.path, query, {k.lower(): v for k, v in h.headers.items()}, body)
        response = Response(404, {"error": {"code": 404, "message": f"no route for {h.command} {parts.path}"}})
        for method, rx, handler in self._routes:
            m = rx.match(parts.path)
            if m and method == h.command:
                request.params = m.groupdict()
                with self.lock:
                    self.requests.append(request)
                try:
                    response = handler(request)
                except Exception as e:  # a bug in the fake: make it visible to the test
                    response = Response(500, {"error": {"code": 500, "message": f"fake server error: {e!r}"}})
                break
        self._send(h, response)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, response: Response) -> None:
        if response.body is None:
            payload, ctype = b"", "application/json"
        elif isinstance(response.body, str):
            payload, ctype = response.body.encode(), "text/plain"
        else:
            payload, ctype = json.dumps(response.body).encode(), "application/json; charset=utf-8"
        h.send_response(response.status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(payload)))
        for k, v in response.headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)
