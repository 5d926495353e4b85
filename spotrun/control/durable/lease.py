"""The controller lease: one object in the store, changed only by compare-and-swap.

`lease.json` = {"holder": id, "host", "pid", "expires_at"}. A controller acquires it when it is
absent, expired, released, or held by a dead process on this same host (a SIGKILLed controller
is replaced at once, as the SQLite claim did; from another host it is taken only once expired).
It renews with `If-Match` on the etag it last wrote: if anyone else wrote in between, the renewal
fails and the controller stands down. Of two controllers racing for the same etag the store lets
exactly one write win (S3 `If-Match`/`If-None-Match`, GCS generations, Azure ETags, a flock here).

Expiry compares wall clocks of different machines: keep them NTP-synced; the TTL (60 s by default,
`SPOTRUN_LEASE_TTL`) must exceed the longest skew plus the longest pause between two renewals.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spotrun.clouds.store import NotFound, PreconditionFailed, Store, StoreError
from spotrun.control.durable import control_key
from spotrun.pids import pid_alive

DEFAULT_TTL = 60.0


def lease_ttl() -> float:
    try:
        return max(0.5, float(os.environ.get("SPOTRUN_LEASE_TTL", DEFAULT_TTL)))
    except ValueError:
        return DEFAULT_TTL


@dataclass(frozen=True)
class Holder:
    id: str
    host: str
    pid: int

    @classmethod
    def me(cls) -> Holder:
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid())


def lease_live(lease: dict[str, Any] | None, now: float, host: str | None = None) -> bool:
    """Whether the lease is held: not released, not expired, and not by a dead pid on this host."""
    if not lease or not lease.get("holder"):
        return False
    if float(lease.get("expires_at") or 0) <= now:
        return False
    if lease.get("host") == (host or socket.gethostname()) and not pid_alive(int(lease.get("pid") or 0)):
        return False
    return True


def read_lease(store: Store, job_id: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(store.get_bytes(control_key(job_id, "lease.json"))))
    except (NotFound, ValueError):
        return None


class Lease:
    """One controller's hold on one job."""

    def __init__(
        self,
        store: Store,
        job_id: str,
        *,
        holder: Holder | None = None,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
        key: str | None = None,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.key = key or control_key(job_id, "lease.json")
        self.extra: dict[str, Any] = {}  # more fields to keep in the lease object (the host's instance)
        self.holder = holder or Holder.me()
        self.ttl = ttl if ttl is not None else lease_ttl()
        self.clock = clock
        self.etag: str | None = None
        self.expires_at = 0.0
        self._renewed = 0.0

    @property
    def held(self) -> bool:
        return self.etag is not None

    def _body(self, now: float, expires_at: float) -> bytes:
        h = self.holder
        holder = h.id if expires_at > 0 else None
        body = {**self.extra, "holder": holder, "host": h.host, "pid": h.pid, "at": now, "expires_at": expires_at}
        return json.dumps(body).encode()

    def acquire(self) -> bool:
        """Take the lease if nobody live holds it; True when this controller now holds it."""
        now = self.clock()
        try:
            data, etag = self.store.get_versioned(self.key)
        except NotFound:
            return self._write(now, if_absent=True)
        try:
            current = json.loads(data)
        except ValueError:
            current = {}
        if current.get("holder") not in (None, self.holder.id) and lease_live(current, now, self.holder.host):
            return False
        return self._write(now, if_match=etag)

    def renew(self, *, force: bool = False) -> bool:
        """Extend the lease (at most every ttl/3 unless forced). False: another controller took it
        (this one must stop driving the job). A store that fails transiently is tolerated until
        the lease would have expired."""
        if self.etag is None:
            return False
        now = self.clock()
        if not force and now - self._renewed < self.ttl / 3:
            return True
        try:
            return self._write(now, if_match=self.etag)
        except StoreError:
            return now < self.expires_at

    def release(self) -> None:
        if self.etag is None:
            return
        try:
            self.store.put_versioned(self.key, self._body(self.clock(), 0.0), if_match=self.etag)
        except StoreError:
            pass  # taken over, or the store is down: it expires on its own
        self.etag = None

    def _write(self, now: float, *, if_absent: bool = False, if_match: str | None = None) -> bool:
        expires = now + self.ttl
        try:
            self.etag = self.store.put_versioned(
                self.key, self._body(now, expires), if_absent=if_absent, if_match=if_match
            )
        except PreconditionFailed:
            self.etag = None
            return False
        self.expires_at = expires
        self._renewed = now
        return True
