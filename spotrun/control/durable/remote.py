"""A job seen from only the store (another SPOTRUN_HOME, a CI runner, a teammate): its record,
its lease, and a cancel request. Quacks like the parts of State that the CLI's readers use
(`job`, `attempts`, `events`), re-reading the record at most every `max_age` seconds."""

from __future__ import annotations

import json
import time
from typing import Any

from spotrun.clouds.store import Store, open_store
from spotrun.control.durable import control_key
from spotrun.control.durable.lease import lease_live, read_lease
from spotrun.control.durable.record import parse, read_record
from spotrun.control.state import Attempt, Event, Job


class NoRecord(KeyError):
    pass


def resolve_job_id(store: Store, ref: str) -> str:
    """The job `ref` names in the store: its id, or a unique id prefix (ids begin with the job's
    name, so a name works while it is unique). NoRecord when none matches, or with the candidates
    when several do."""
    from spotrun.control.durable.record import record_key

    if not ref or "/" in ref:
        raise NoRecord(f"no job {ref!r} recorded in {store.url}")
    if store.exists(record_key(ref)):
        return ref
    ids = sorted({k.split("/")[1] for k in store.list(f"jobs/{ref}") if k == record_key(k.split("/")[1])})
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise NoRecord(f"no job {ref!r} recorded in {store.url}")
    listed = ", ".join(ids[:10]) + (" …" if len(ids) > 10 else "")
    raise NoRecord(f"{ref!r} matches {len(ids)} jobs in {store.url} ({listed}); give the job id")


class StoreView:
    def __init__(self, store_url: str | Store, job_id: str, *, max_age: float = 0.2) -> None:
        self.store = open_store(store_url) if isinstance(store_url, str) else store_url
        self.job_id = resolve_job_id(self.store, job_id)
        self.max_age = max_age
        self._read_at = -1.0
        self._parsed: tuple[Job, list[Attempt], list[Event]] | None = None
        self.refresh()

    def refresh(self) -> None:
        record = read_record(self.store, self.job_id)
        if record is None:
            raise NoRecord(f"no job {self.job_id!r} recorded in {self.store.url}")
        self._parsed = parse(record)
        self._read_at = time.monotonic()

    def _get(self) -> tuple[Job, list[Attempt], list[Event]]:
        if self._parsed is None or time.monotonic() - self._read_at > self.max_age:
            self.refresh()
        assert self._parsed is not None
        return self._parsed

    def job(self, job_id: str | None = None) -> Job:
        return self._get()[0]

    def attempts(self, job_id: str | None = None) -> list[Attempt]:
        return self._get()[1]

    def events(self, job_id: str | None = None, after_id: int = 0) -> list[Event]:
        return [e for e in self._get()[2] if e.id > after_id]

    def lease(self) -> dict[str, Any] | None:
        return read_lease(self.store, self.job_id)

    def controller_alive(self) -> bool:
        return lease_live(self.lease(), time.time())

    def request_cancel(self) -> None:
        body = json.dumps({"at": time.time()}).encode()
        self.store.put_bytes(control_key(self.job_id, "cancel"), body)
