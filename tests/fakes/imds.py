"""A fake EC2 instance metadata service (IMDSv2 only) on 127.0.0.1, one per emulated instance.

It speaks the part of IMDS spotrun reads: `PUT /latest/api/token` (with the TTL header), then, with
the token, `meta-data/spot/instance-action` (404 until `announce_interruption`),
`meta-data/events/recommendations/rebalance` (404 until `recommend_rebalance`), `instance-id` and
`placement/availability-zone`, and, for an instance launched with an instance profile (`role`),
`iam/security-credentials/` (the role's name) and `iam/security-credentials/<role>` (its temporary
credentials: here the keys the test's moto accepts). A GET without a valid token gets 401, as on an
instance launched with `HttpTokens=required`.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeIMDS:
    def __init__(
        self,
        instance_id: str = "i-0000000000000000",
        zone: str = "us-east-1a",
        *,
        role: str | None = None,
        credentials: tuple[str, str] = ("", ""),
    ) -> None:
        self.instance_id = instance_id
        self.zone = zone
        self.role = role
        self.credentials = credentials
        self.tokens: dict[str, float] = {}  # token -> expiry (epoch)
        self.requests: list[tuple[str, str]] = []  # (method, path), for tests
        self._action: dict[str, str] | None = None
        self._rebalance: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def announce_interruption(self, seconds: float = 120.0, action: str = "terminate") -> float:
        """From now on, instance-action says the instance goes in `seconds`. Returns that time."""
        when = time.time() + seconds
        with self._lock:
            self._action = {"action": action, "time": _iso(when)}
        return when

    def recommend_rebalance(self) -> None:
        with self._lock:
            self._rebalance = {"noticeTime": _iso(time.time())}

    def expire_tokens(self) -> None:
        """Every token issued so far stops working (the next GET with one gets 401)."""
        with self._lock:
            self.tokens.clear()

    def clear(self) -> None:
        with self._lock:
            self._action = self._rebalance = None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeIMDS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP

    def _answer(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        with self._lock:
            self.requests.append((method, path))
            if method == "PUT":
                if path != "/latest/api/token":
                    return 405, ""
                try:
                    ttl = int(headers.get("x-aws-ec2-metadata-token-ttl-seconds", ""))
                except ValueError:
                    return 400, ""
                if not 1 <= ttl <= 21600:
                    return 400, ""
                token = secrets.token_urlsafe(24)
                self.tokens[token] = time.time() + ttl
                return 200, token
            token = headers.get("x-aws-ec2-metadata-token", "")
            if self.tokens.get(token, 0.0) < time.time():
                return 401, ""
            documents = {
                "/latest/meta-data/instance-id": self.instance_id,
                "/latest/meta-data/placement/availability-zone": self.zone,
                "/latest/meta-data/spot/instance-action": json.dumps(self._action) if self._action else None,
                "/latest/meta-data/events/recommendations/rebalance": (
                    json.dumps(self._rebalance) if self._rebalance else None
                ),
            }
            if self.role:
                key, secret = self.credentials
                creds = {
                    "Code": "Success",
                    "Type": "AWS-HMAC",
                    "AccessKeyId": key,
                    "SecretAccessKey": secret,
                    "Token": "fake-session-token",
                    "LastUpdated": _iso(time.time()),
                    "Expiration": _iso(time.time() + 6 * 3600),
                }
                documents["/latest/meta-data/iam/security-credentials/"] = self.role
                documents[f"/latest/meta-data/iam/security-credentials/{self.role}"] = json.dumps(creds)
            body = documents.get(path)
            return (404, "") if body is None else (200, body)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def _respond(self, method: str) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, body = imds._answer(method, self.path, headers)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
                self._respond("GET")

            def do_PUT(self) -> None:  # noqa: N802
                self._respond("PUT")

            def log_message(self, *args: object) -> None:  # quiet
                pass

        return Handler
