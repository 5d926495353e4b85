"""`DurableState`: the SQLite State, mirrored to the store and guarded by the store's lease.

Everything is in the hooks State already has, so no part of the controller changes:

- `claim_controller` also takes the lease (and stands down, like a busy local claim, when another
  controller anywhere holds it); `release_controller` lets it go;
- `touch_controller`, which the loop calls every round, renews the lease (a lost lease makes the
  controller stop) and picks up a cancel request written to the store by another machine;
- `after_commit` writes the job's record after every transaction that changed it, while this
  controller holds the lease: the store is written before the controller acts, as SQLite is.
  Each write is fenced: it must find the record as this controller last left it (If-Match on the
  etag it read at its claim, then on each one it wrote). A controller that was frozen past its
  lease and replaced finds the record changed, writes nothing and stops (ControllerBusy) instead of
  overwriting its successor's record with a stale one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from spotrun.clouds.store import NotFound, PreconditionFailed, Store, StoreError, open_store
from spotrun.control.durable import control_key
from spotrun.control.durable.lease import Holder, Lease, LeaseKeeper
from spotrun.control.durable.record import encode, record_key
from spotrun.control.outcome import ControllerBusy
from spotrun.control.state import State

CANCEL_CHECK_EVERY = 5.0  # seconds between looks for a remote cancel request (one GET each)


class DurableState(State):
    def __init__(
        self,
        path: str | Path,
        *,
        holder: Holder | None = None,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
        keep_alive: bool = False,
    ) -> None:
        """`keep_alive`: renew each held lease from a background thread too (LeaseKeeper), so a
        controller busy longer than the TTL keeps its job; the controllers' own processes use it,
        tests that play with a fake clock do not."""
        super().__init__(path)
        self._keep_alive = keep_alive
        self._keepers: dict[str, LeaseKeeper] = {}
        self._record_etags: dict[str, str | None] = {}  # the record as this controller last saw it
        self.holder = holder or Holder.me()
        self._ttl = ttl
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._stores: dict[str, Store] = {}
        self._cancel_checked: dict[str, float] = {}

    @classmethod
    def open_default(cls) -> DurableState:
        from spotrun.paths import state_db

        return cls(state_db(), keep_alive=True)

    def store_of(self, job_id: str) -> Store:
        url = self.job(job_id).store_url
        if url not in self._stores:
            self._stores[url] = open_store(url)
        return self._stores[url]

    def lease(self, job_id: str) -> Lease | None:
        return self._leases.get(job_id)

    # ------------------------------------------------------------------ the controller's hooks

    def claim_controller(self, job_id: str, pid: int, now: float, stale_after: float) -> bool:
        if not super().claim_controller(job_id, pid, now, stale_after):
            return False
        lease = Lease(self.store_of(job_id), job_id, holder=self.holder, ttl=self._ttl, clock=self._clock)
        if not lease.acquire():
            super().release_controller(job_id, pid)
            return False
        self._leases[job_id] = lease
        try:
            self._record_etags[job_id] = self._record_etag(lease.store, job_id)
        except StoreError:
            self._leases.pop(job_id, None)
            lease.release()
            super().release_controller(job_id, pid)
            raise
        if self._keep_alive:
            self._keepers[job_id] = LeaseKeeper(lease).start()
        self.publish(job_id)
        return True

    def touch_controller(self, job_id: str, pid: int, now: float) -> bool:
        if not super().touch_controller(job_id, pid, now):
            return False
        lease = self._leases.get(job_id)
        if lease is None:
            return True
        keeper = self._keepers.get(job_id)
        if keeper is not None:
            keeper.beat()
        if not lease.renew():
            self._lose(job_id)
            return False
        self._pick_up_cancel(job_id, now)
        return True

    def release_controller(self, job_id: str, pid: int) -> None:
        self._stop_keeper(job_id)
        lease = self._leases.pop(job_id, None)
        if lease is not None and lease.held:
            try:
                self._publish_retrying(lease.store, job_id)
            except StoreError:
                pass  # the record stays behind: whoever reads it next adopts the job and republishes
            except ControllerBusy:
                pass  # another controller has the job (and its lease): nothing of ours to write
            finally:
                lease.release()
        self._record_etags.pop(job_id, None)
        super().release_controller(job_id, pid)

    def after_commit(self, job_id: str) -> None:
        if job_id in self._leases:
            self.publish(job_id)

    def close(self) -> None:
        for job_id in list(self._keepers):
            self._stop_keeper(job_id)
        super().close()

    # ------------------------------------------------------------------ helpers

    def _stop_keeper(self, job_id: str) -> None:
        keeper = self._keepers.pop(job_id, None)
        if keeper is not None:
            keeper.stop()

    def publish(self, job_id: str) -> None:
        lease = self._leases.get(job_id)
        if lease is not None and lease.held:
            self._publish_retrying(lease.store, job_id)

    @staticmethod
    def _record_etag(store: Store, job_id: str) -> str | None:
        try:
            return store.get_versioned(record_key(job_id))[1]
        except NotFound:
            return None

    def _publish_retrying(self, store: Store, job_id: str) -> None:
        """A store hiccup is retried for a few seconds; past that the error stops the controller
        (its record must not fall behind what it does: another machine would act on a stale one).
        A record someone else wrote since this controller's last write stops it (ControllerBusy)."""
        data = encode(self, job_id)
        for delay in (0.2, 0.5, 1.0, 2.0, None):
            try:
                self._write_fenced(store, job_id, data)
                return
            except PreconditionFailed:
                self._lose(job_id)
                raise ControllerBusy(
                    f"job {job_id}: another controller has written its record since this one last did; this one stops"
                ) from None
            except StoreError:
                if delay is None:
                    raise
                time.sleep(delay)

    def _write_fenced(self, store: Store, job_id: str, data: bytes) -> None:
        key = record_key(job_id)
        etag = self._record_etags.get(job_id)
        try:
            if etag:
                new = store.put_versioned(key, data, if_match=etag)
            else:
                new = store.put_versioned(key, data, if_absent=True)
        except PreconditionFailed:
            # a write of ours that landed although its answer was lost (then retried) is ours: go on
            try:
                current, current_etag = store.get_versioned(key)
            except NotFound:
                raise PreconditionFailed(f"{key} was deleted") from None
            if current != data:
                raise
            new = current_etag
        self._record_etags[job_id] = new

    def _lose(self, job_id: str) -> None:
        """Another controller drives the job: let go of everything without writing anything."""
        self._stop_keeper(job_id)
        self._leases.pop(job_id, None)
        self._record_etags.pop(job_id, None)

    def _pick_up_cancel(self, job_id: str, now: float) -> None:
        wall = self._clock()
        lease = self._leases.get(job_id)
        every = min(CANCEL_CHECK_EVERY, lease.ttl / 3) if lease is not None else CANCEL_CHECK_EVERY
        if wall - self._cancel_checked.get(job_id, 0.0) < every:
            return
        self._cancel_checked[job_id] = wall
        if self.job(job_id).cancel_requested:
            return
        store = self.store_of(job_id)
        if store.exists(control_key(job_id, "cancel")):
            self.request_cancel(job_id, now)
