"""The controller's memory: jobs, attempts and events in SQLite (WAL).

Every transition is written here *before* the controller acts on it (write-ahead), so a
controller that is killed and restarted can pick up exactly where it was: an attempt row in
LAUNCHING with its client token means "a launch may have happened", and the provider's
idempotent launch / `list_owned` settle it without ever starting a second instance.

Several spotrun processes may open the database at once (a detached controller, `status`,
`cancel`): WAL lets readers run beside the writer, writes take `BEGIN IMMEDIATE` and wait on
a busy timeout instead of failing.

Nothing secret is stored: the spec is kept with secret env values replaced by "<redacted>".
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from spotrun.pids import pid_alive

SCHEMA_VERSION = 2

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        spec_json TEXT NOT NULL,
        spec_path TEXT,
        store_url TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        ended_at REAL,
        exit_code INTEGER,
        job_exit_code INTEGER,
        reason TEXT NOT NULL DEFAULT '',
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        controller_pid INTEGER,
        controller_seen REAL
    );
    CREATE TABLE attempts (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        n INTEGER NOT NULL,
        status TEXT NOT NULL,
        provider TEXT NOT NULL,
        region TEXT NOT NULL,
        zone TEXT NOT NULL,
        instance_type TEXT NOT NULL,
        spot INTEGER NOT NULL,
        offer_key TEXT NOT NULL,
        hourly_price REAL NOT NULL,
        ondemand_price REAL,
        time_scale REAL NOT NULL DEFAULT 1.0,
        client_token TEXT NOT NULL,
        instance_id TEXT,
        instance_json TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        end_reason TEXT,
        exit_code INTEGER,
        detail TEXT NOT NULL DEFAULT '',
        cost REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, n)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        data_json TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_job ON events(job_id, id);
    """,
    # 2: each attempt records the store its instance used (clouds may keep checkpoints in their own).
    2: """
    ALTER TABLE attempts ADD COLUMN store_url TEXT;
    """,
}


class JobStatus(StrEnum):
    PENDING = "PENDING"  # submitted, nothing launched yet
    LAUNCHING = "LAUNCHING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"  # preempted or failed, about to relaunch
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    NO_CAPACITY = "NO_CAPACITY"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = {
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
    JobStatus.NO_CAPACITY,
    JobStatus.BUDGET_EXHAUSTED,
    JobStatus.DEADLINE_EXCEEDED,
}


class AttemptStatus(StrEnum):
    LAUNCHING = "LAUNCHING"  # written before provider.launch is called
    RUNNING = "RUNNING"  # the provider returned an instance
    ENDED = "ENDED"


@dataclass
class Job:
    id: str
    name: str
    status: JobStatus
    spec: dict[str, Any]
    spec_path: str | None
    store_url: str
    created_at: float
    updated_at: float
    ended_at: float | None
    exit_code: int | None
    job_exit_code: int | None
    reason: str
    cancel_requested: bool
    controller_pid: int | None
    controller_seen: float | None


@dataclass
class Attempt:
    job_id: str
    n: int
    status: AttemptStatus
    provider: str
    region: str
    zone: str
    instance_type: str
    spot: bool
    offer_key: str
    hourly_price: float
    ondemand_price: float | None
    time_scale: float
    client_token: str
    instance_id: str | None
    instance: dict[str, Any] | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    end_reason: str | None
    exit_code: int | None
    detail: str
    cost: float
    store_url: str | None = None  # None: the job's own store

    @property
    def location(self) -> str:
        return self.zone or self.region

    def billed_hours(self, now: float) -> float:
        """Hours this attempt has been (or was) billed, in simulated time for the local market."""
        if self.started_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else now
        return max(0.0, end - self.started_at) * self.time_scale / 3600.0

    def cost_at(self, now: float) -> float:
        return self.cost if self.status == AttemptStatus.ENDED else self.billed_hours(now) * self.hourly_price

    def ondemand_cost_at(self, now: float) -> float | None:
        if self.ondemand_price is None:
            return None
        return self.billed_hours(now) * self.ondemand_price


@dataclass
class Event:
    id: int
    job_id: str
    at: float
    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


class StateError(Exception):
    pass


class State:
    """One SQLite database; safe to share between threads of one process and between processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        for suffix in ("", "-wal", "-shm", "-journal"):  # jobs, specs and events: the owner's only
            try:
                os.chmod(f"{self.path}{suffix}", 0o600)
            except OSError:
                pass
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @classmethod
    def open_default(cls) -> State:
        from spotrun.paths import state_db

        return cls(state_db())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._changed: set[str] = set()  # jobs this transaction wrote an event for
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            changed, self._changed = self._changed, set()
        for job_id in sorted(changed):
            self.after_commit(job_id)

    def after_commit(self, job_id: str) -> None:
        """Called once a transaction that changed this job (wrote one of its events) is committed,
        outside the lock. A hook: `spotrun.control.durable` mirrors the job's record to the store."""

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(f"{self.path} was written by a newer spotrun (schema {version} > {SCHEMA_VERSION})")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[v].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={v}")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # ------------------------------------------------------------------ jobs

    def create_job(
        self, job_id: str, name: str, spec: dict[str, Any], store_url: str, now: float, spec_path: str | None
    ) -> Job:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, name, status, spec_json, spec_path, store_url, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, JobStatus.PENDING.value, json.dumps(spec), spec_path, store_url, now, now),
            )
            self._event(db, job_id, now, "submitted", f"job {job_id} submitted")
        return self.job(job_id)

    def job(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    def find_job(self, ref: str) -> Job:
        """A job by id, unique id prefix, or unique name. KeyError (with the candidates) otherwise."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (ref,)).fetchone()
            if row is not None:
                return _job(row)
            named = self._db.execute("SELECT * FROM jobs WHERE name = ? ORDER BY created_at DESC", (ref,)).fetchall()
            prefixed = self._db.execute(
                "SELECT * FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY created_at DESC", (len(ref), ref)
            ).fetchall()
        rows = {r["id"]: r for r in [*named, *prefixed]}
        if len(rows) == 1:
            return _job(next(iter(rows.values())))
        if not rows:
            raise KeyError(f"no job {ref!r}")
        ids = ", ".join(list(rows)[:10]) + (" …" if len(rows) > 10 else "")
        raise KeyError(f"{ref!r} matches {len(rows)} jobs ({ids}); give the job id")

    def jobs(self, limit: int | None = 50) -> list[Job]:
        """The newest `limit` jobs (None or 0: all), newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit if limit else -1,)
            ).fetchall()
        return [_job(r) for r in rows]

    def count_jobs(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    def delete_job(self, job_id: str) -> None:
        """Forget a finished job: its events, attempts and row (`spotrun rm`). Refuses a live job."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if JobStatus(row["status"]) not in TERMINAL:
                raise StateError(f"job {job_id} is {row['status']}: cancel it before removing it")
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM attempts WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def set_job_status(
        self,
        job_id: str,
        status: JobStatus,
        now: float,
        *,
        reason: str | None = None,
        exit_code: int | None = None,
        job_exit_code: int | None = None,
    ) -> None:
        with self._tx() as db:
            sets = ["status = ?", "updated_at = ?"]
            args: list[Any] = [status.value, now]
            if reason is not None:
                sets.append("reason = ?")
                args.append(reason)
            if status in TERMINAL:
                sets += ["ended_at = ?", "exit_code = ?"]
                args += [now, exit_code]
            if job_exit_code is not None:
                sets.append("job_exit_code = ?")
                args.append(job_exit_code)
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
            self._event(db, job_id, now, "status", f"{status.value}" + (f": {reason}" if reason else ""))

    def request_cancel(self, job_id: str, now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, job_id))
            self._event(db, job_id, now, "cancel", "cancel requested")

    def claim_controller(self, job_id: str, pid: int, now: float, stale_after: float) -> bool:
        """Become the job's controller, unless another live one holds it. Returns True on success."""
        with self._tx() as db:
            row = db.execute("SELECT controller_pid, controller_seen FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            holder, seen = row["controller_pid"], row["controller_seen"]
            if holder and holder != pid and pid_alive(holder):
                # A live holder keeps the job while it checks in; one that has gone quiet keeps it too
                # while its pid still runs spotrun (a long launch or upload, not a death): taking over
                # from a busy controller would start a second instance. Only a pid reused by some
                # other program after a quiet spell is taken over.
                fresh = seen is not None and now - seen < stale_after
                if fresh or pid_alive(holder, cmd_hint="spotrun"):
                    return False
            db.execute("UPDATE jobs SET controller_pid = ?, controller_seen = ? WHERE id = ?", (pid, now, job_id))
            return True

    def touch_controller(self, job_id: str, pid: int, now: float) -> bool:
        """Check in as the job's controller; False when another controller has taken the job over."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET controller_seen = ? WHERE id = ? AND controller_pid = ?", (now, job_id, pid)
            )
            return cur.rowcount == 1

    def release_controller(self, job_id: str, pid: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET controller_pid = NULL, controller_seen = NULL WHERE id = ? AND controller_pid = ?",
                (job_id, pid),
            )

    def replace_job(self, job: Job, attempts: list[Attempt], events: list[Event]) -> None:
        """Put a job's rows back as another machine last recorded them (the store's record is the
        truth, this database a cache): the job, its attempts and its events, with no controller."""
        with self._lock, self._tx() as db:
            db.execute("DELETE FROM events WHERE job_id = ?", (job.id,))
            db.execute("DELETE FROM attempts WHERE job_id = ?", (job.id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
            db.execute(
                "INSERT INTO jobs (id, name, status, spec_json, spec_path, store_url, created_at, updated_at,"
                " ended_at, exit_code, job_exit_code, reason, cancel_requested) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job.id, job.name, job.status.value, json.dumps(job.spec), job.spec_path, job.store_url,
                    job.created_at, job.updated_at, job.ended_at, job.exit_code, job.job_exit_code, job.reason,
                    int(job.cancel_requested),
                ),
            )  # fmt: skip
            for a in attempts:
                db.execute(
                    "INSERT INTO attempts (job_id, n, status, provider, region, zone, instance_type, spot, offer_key,"
                    " hourly_price, ondemand_price, time_scale, client_token, instance_id, instance_json, created_at,"
                    " started_at, ended_at, end_reason, exit_code, detail, cost, store_url)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        job.id, a.n, a.status.value, a.provider, a.region, a.zone, a.instance_type, int(a.spot),
                        a.offer_key, a.hourly_price, a.ondemand_price, a.time_scale, a.client_token, a.instance_id,
                        json.dumps(a.instance) if a.instance is not None else None, a.created_at, a.started_at,
                        a.ended_at, a.end_reason, a.exit_code, a.detail, a.cost, a.store_url,
                    ),
                )  # fmt: skip
            for e in events:
                db.execute(
                    "INSERT INTO events (id, job_id, at, kind, message, data_json) VALUES (?, ?, ?, ?, ?, ?)",
                    (e.id, job.id, e.at, e.kind, e.message, json.dumps(e.data)),
                )

    # ------------------------------------------------------------------ attempts

    def begin_attempt(
        self,
        job_id: str,
        *,
        provider: str,
        region: str,
        zone: str,
        instance_type: str,
        spot: bool,
        offer_key: str,
        hourly_price: float,
        ondemand_price: float | None,
        time_scale: float,
        now: float,
        store_url: str | None = None,
    ) -> Attempt:
        """Write-ahead record of a launch about to be made; its client token makes it idempotent."""
        with self._tx() as db:
            n = db.execute("SELECT COALESCE(MAX(n), 0) + 1 FROM attempts WHERE job_id = ?", (job_id,)).fetchone()[0]
            token = f"{job_id}-a{n}"
            db.execute(
                "INSERT INTO attempts (job_id, n, status, provider, region, zone, instance_type, spot,"
                " offer_key, hourly_price, ondemand_price, time_scale, client_token, created_at, store_url)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id, n, AttemptStatus.LAUNCHING.value, provider, region, zone, instance_type,
                    int(spot), offer_key, hourly_price, ondemand_price, time_scale, token, now, store_url,
                ),
            )  # fmt: skip
            db.execute(
                "UPDATE jobs SET status = ?, updated_at = ? WHERE id = ?",
                (JobStatus.LAUNCHING.value, now, job_id),
            )
            kind = "spot" if spot else "on-demand"
            self._event(
                db, job_id, now, "launch",
                f"attempt {n}: launching {kind} {instance_type} in {provider}/{zone or region}"
                f" at ${hourly_price:.4f}/h",
                {"attempt": n, "offer": offer_key, "spot": spot},
            )  # fmt: skip
        return self.attempt(job_id, n)

    def attempt_started(self, job_id: str, n: int, instance_id: str, instance: dict[str, Any], now: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET status = ?, instance_id = ?, instance_json = ?, started_at = ?"
                " WHERE job_id = ? AND n = ?",
                (AttemptStatus.RUNNING.value, instance_id, json.dumps(instance), now, job_id, n),
            )
            db.execute(
                "UPDATE jobs SET status = ?, updated_at = ? WHERE id = ?", (JobStatus.RUNNING.value, now, job_id)
            )
            self._event(db, job_id, now, "started", f"attempt {n}: instance {instance_id} started", {"attempt": n})

    def end_attempt(
        self, job_id: str, n: int, reason: str, now: float, *, exit_code: int | None = None, detail: str = ""
    ) -> Attempt:
        """Close an attempt and fix its cost (billed time × hourly price). Idempotent."""
        attempt = self.attempt(job_id, n)
        if attempt.status == AttemptStatus.ENDED:
            return attempt
        ended = now if attempt.started_at is not None else None
        cost = 0.0
        if attempt.started_at is not None:
            cost = max(0.0, now - attempt.started_at) * attempt.time_scale / 3600.0 * attempt.hourly_price
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET status = ?, ended_at = ?, end_reason = ?, exit_code = ?, detail = ?, cost = ?"
                " WHERE job_id = ? AND n = ?",
                (AttemptStatus.ENDED.value, ended, reason, exit_code, detail, cost, job_id, n),
            )
            msg = f"attempt {n}: {reason}" + (f" ({detail})" if detail else "")
            self._event(db, job_id, now, "attempt_end", msg, {"attempt": n, "reason": reason, "exit_code": exit_code})
        return self.attempt(job_id, n)

    def attempt(self, job_id: str, n: int) -> Attempt:
        with self._lock:
            row = self._db.execute("SELECT * FROM attempts WHERE job_id = ? AND n = ?", (job_id, n)).fetchone()
        if row is None:
            raise KeyError((job_id, n))
        return _attempt(row)

    def attempts(self, job_id: str) -> list[Attempt]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,)).fetchall()
        return [_attempt(r) for r in rows]

    def open_attempt(self, job_id: str) -> Attempt | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM attempts WHERE job_id = ? AND status != ? ORDER BY n DESC LIMIT 1",
                (job_id, AttemptStatus.ENDED.value),
            ).fetchone()
        return _attempt(row) if row else None

    # ------------------------------------------------------------------ events

    def add_event(self, job_id: str, now: float, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        with self._tx() as db:
            self._event(db, job_id, now, kind, message, data)

    def events(self, job_id: str, after_id: int = 0) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after_id)
            ).fetchall()
        return [Event(r["id"], r["job_id"], r["at"], r["kind"], r["message"], json.loads(r["data_json"])) for r in rows]

    def _event(
        self,
        db: sqlite3.Connection,
        job_id: str,
        now: float,
        kind: str,
        message: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        self._changed.add(job_id)
        db.execute(
            "INSERT INTO events (job_id, at, kind, message, data_json) VALUES (?, ?, ?, ?, ?)",
            (job_id, now, kind, message, json.dumps(data or {})),
        )


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        name=row["name"],
        status=JobStatus(row["status"]),
        spec=json.loads(row["spec_json"]),
        spec_path=row["spec_path"],
        store_url=row["store_url"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        ended_at=row["ended_at"],
        exit_code=row["exit_code"],
        job_exit_code=row["job_exit_code"],
        reason=row["reason"],
        cancel_requested=bool(row["cancel_requested"]),
        controller_pid=row["controller_pid"],
        controller_seen=row["controller_seen"],
    )


def _attempt(row: sqlite3.Row) -> Attempt:
    return Attempt(
        job_id=row["job_id"],
        n=row["n"],
        status=AttemptStatus(row["status"]),
        provider=row["provider"],
        region=row["region"],
        zone=row["zone"],
        instance_type=row["instance_type"],
        spot=bool(row["spot"]),
        offer_key=row["offer_key"],
        hourly_price=row["hourly_price"],
        ondemand_price=row["ondemand_price"],
        time_scale=row["time_scale"],
        client_token=row["client_token"],
        instance_id=row["instance_id"],
        instance=json.loads(row["instance_json"]) if row["instance_json"] else None,
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        end_reason=row["end_reason"],
        exit_code=row["exit_code"],
        detail=row["detail"],
        cost=row["cost"],
        store_url=row["store_url"],
    )
