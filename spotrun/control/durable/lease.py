"""The controller lease: one object in the store, changed only by compare-and-swap.

`lease.json` = {"holder": id, "host", "pid", "expires_at"}. A controller acquires it when it is
absent, expired, released, or held by a dead process on this same host (a SIGKILLed controller
is replaced at once, as the SQLite claim did; from another host it is taken only once expired).
It renews with `If-Match` on the etag it last wrote: if anyone else wrote in between, the renewal
fails and the controller stands down. Of two controllers racing for the same etag the store lets
exactly one write win (S3 `If-Match`/`If-None-Match`, GCS generations, Azure ETags, a flock here).

Expiry compares wall clocks of different machines: keep them NTP-synced; the TTL (60 s by default,
`SPOTRUN_LEASE_TTL`) must exceed the longest skew plus the longest pause between two renewals.
A `LeaseKeeper` renews from a background thread, so a controller busy in a long launch, upload or
capacity back-off keeps its lease; only one stuck past `MAX_STALL` (or dead) lets it lapse.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spotrun.clouds.store import NotFound, PreconditionFailed, Store, StoreError
from spotrun.control.durable import control_key
from spotrun.pids import pid_alive

DEFAULT_TTL = 60.0
MAX_STALL = 1800.0  # seconds a busy owner keeps its lease without checking in (LeaseKeeper)


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
        self._lock = threading.RLock()  # the owner's loop and its LeaseKeeper renew the same etag

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
        with self._lock:
            return self._acquire()

    def _acquire(self) -> bool:
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
        with self._lock:
            return self._renew(force)

    def _renew(self, force: bool) -> bool:
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
        with self._lock:
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


class LeaseKeeper:
    """Renews a held lease from a daemon thread (at most every ttl/3, at least every 7/12 of the
    TTL) while its owner checks in (`beat`) at least every `max_stall` seconds. Without it a
    controller busy for longer than the TTL (a slow launch, a big upload, a capacity back-off, a
    loaded machine) would look dead, and another machine's `wait` would adopt the job from under
    it: two controllers displacing each other in turn, neither making progress. A lost renewal
    (someone else wrote) leaves the lease unheld, which the owner's next `renew` reports."""

    def __init__(self, lease: Lease, *, max_stall: float = MAX_STALL) -> None:
        self.lease = lease
        self.max_stall = max_stall
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def beat(self) -> None:
        self._beat = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        period = max(0.05, self.lease.ttl / 4)
        while not self._stop.wait(period):
            if not self.lease.held or time.monotonic() - self._beat > self.max_stall:
                return  # lost, released, or its owner is stuck: let it lapse
            self.lease.renew()
