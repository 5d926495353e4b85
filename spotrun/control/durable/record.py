"""The job's record in the store: `jobs/<id>/control/record.json`, one JSON document holding the
job row, its attempts and its events as the controller last committed them.

One object rewritten whole (not one object per change): a reader gets a consistent snapshot with
one GET, and the job's few dozen rows stay a few KB. Nothing secret: the spec in it is the one
State keeps, with secret env values already replaced by "<redacted>".
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from spotrun.clouds.store import NotFound, Store
from spotrun.control.durable import control_key
from spotrun.control.state import Attempt, AttemptStatus, Event, Job, JobStatus, State

FORMAT = 1
_JOB_FIELDS = [f.name for f in dataclasses.fields(Job) if f.name not in ("controller_pid", "controller_seen")]


def record_key(job_id: str) -> str:
    return control_key(job_id, "record.json")


def snapshot(state: State, job_id: str) -> dict[str, Any]:
    job = state.job(job_id)
    return {
        "format": FORMAT,
        "job": {name: getattr(job, name) for name in _JOB_FIELDS},
        "attempts": [dataclasses.asdict(a) for a in state.attempts(job_id)],
        "events": [dataclasses.asdict(e) for e in state.events(job_id)],
    }


def encode(state: State, job_id: str) -> bytes:
    return json.dumps(snapshot(state, job_id), default=str).encode()


def publish(state: State, store: Store, job_id: str) -> None:
    store.put_bytes(record_key(job_id), encode(state, job_id))


def read_record(store: Store, job_id: str) -> dict[str, Any] | None:
    try:
        record = json.loads(store.get_bytes(record_key(job_id)))
    except (NotFound, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def parse(record: dict[str, Any]) -> tuple[Job, list[Attempt], list[Event]]:
    raw = dict(record["job"])
    raw["status"] = JobStatus(raw["status"])
    job = Job(**raw, controller_pid=None, controller_seen=None)
    attempts = []
    for a in record.get("attempts") or []:
        a = dict(a)
        a["status"] = AttemptStatus(a["status"])
        attempts.append(Attempt(**a))
    events = [Event(**e) for e in record.get("events") or []]
    return job, attempts, events


def last_event_id(events: list[Event]) -> int:
    return max((e.id for e in events), default=0)
