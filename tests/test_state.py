import multiprocessing as mp
import sqlite3

import pytest

from spotrun.control.state import SCHEMA_VERSION, AttemptStatus, JobStatus, State, StateError


def make_job(state: State, job_id: str = "j1", now: float = 1000.0) -> None:
    state.create_job(job_id, "demo", {"name": "demo", "env": {}}, "file:///tmp/x", now, None)


def begin(state: State, job_id: str = "j1", now: float = 1000.0, price: float = 2.0, scale: float = 1.0):
    return state.begin_attempt(
        job_id,
        provider="local",
        region="local-1",
        zone="local-1a",
        instance_type="gpu1",
        spot=True,
        offer_key="local/local-1a/gpu1",
        hourly_price=price,
        ondemand_price=6.0,
        time_scale=scale,
        now=now,
    )


def test_fresh_database_has_current_schema(tmp_path):
    state = State(tmp_path / "s.db")
    assert state.schema_version == SCHEMA_VERSION
    mode = sqlite3.connect(tmp_path / "s.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_newer_schema_is_refused(tmp_path):
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match="newer spotrun"):
        State(tmp_path / "s.db")


def test_attempt_lifecycle_and_cost(tmp_path):
    state = State(tmp_path / "s.db")
    make_job(state)
    a = begin(state, now=1000.0, price=3.0, scale=60.0)
    assert a.n == 1 and a.status == AttemptStatus.LAUNCHING and a.client_token == "j1-a1"
    assert state.open_attempt("j1").n == 1
    state.attempt_started("j1", 1, "i-1", {"instance_id": "i-1"}, 1010.0)
    assert state.job("j1").status == JobStatus.RUNNING
    # 60 real seconds at time_scale 60 = 1 simulated hour at $3/h
    assert state.attempt("j1", 1).cost_at(1070.0) == pytest.approx(3.0)
    ended = state.end_attempt("j1", 1, "preempted", 1070.0)
    assert ended.cost == pytest.approx(3.0) and ended.end_reason == "preempted"
    assert state.end_attempt("j1", 1, "completed", 2000.0).end_reason == "preempted"  # idempotent
    assert state.open_attempt("j1") is None
    assert begin(state).n == 2


def test_attempt_that_never_started_costs_nothing(tmp_path):
    state = State(tmp_path / "s.db")
    make_job(state)
    begin(state)
    assert state.end_attempt("j1", 1, "launch_failed", 5000.0).cost == 0.0


def test_terminal_status_records_exit_code_and_event(tmp_path):
    state = State(tmp_path / "s.db")
    make_job(state)
    state.set_job_status("j1", JobStatus.FAILED, 1200.0, reason="boom", exit_code=1, job_exit_code=7)
    job = state.job("j1")
    assert (job.status, job.exit_code, job.job_exit_code, job.ended_at) == (JobStatus.FAILED, 1, 7, 1200.0)
    assert job.status.terminal
    assert [e.kind for e in state.events("j1")] == ["submitted", "status"]


def test_find_job_by_prefix_and_name(tmp_path):
    state = State(tmp_path / "s.db")
    make_job(state, "demo-1126-aaaaaa", 1.0)
    make_job(state, "demo-1126-bbbbbb", 2.0)
    assert state.find_job("demo-1126-a").id == "demo-1126-aaaaaa"
    with pytest.raises(KeyError, match="demo-1126-aaaaaa"):  # a shared name is ambiguous: the candidates are listed
        state.find_job("demo")
    with pytest.raises(KeyError, match="matches 2 jobs"):
        state.find_job("demo-1126")
    with pytest.raises(KeyError):
        state.find_job("nope")


def _until_exec_done(pid: int) -> None:
    """Popen returns once exec has begun, but /proc/<pid>/cmdline stays empty until the kernel has
    laid out the new program's arguments; pid_alive reads an empty one as "ours, mid-exec"."""
    import time
    from pathlib import Path

    end = time.monotonic() + 10
    while not Path(f"/proc/{pid}/cmdline").read_bytes() and time.monotonic() < end:
        time.sleep(0.001)


def test_controller_claim_excludes_a_second_live_controller(tmp_path):
    import os
    import subprocess

    state = State(tmp_path / "s.db")
    make_job(state)
    assert state.claim_controller("j1", os.getpid(), 100.0, stale_after=10)
    assert not state.claim_controller("j1", 1, 105.0, stale_after=10)  # the holder (us) is alive and fresh
    assert not state.touch_controller("j1", 1, 106.0)  # pid 1 does not hold the job
    assert state.touch_controller("j1", os.getpid(), 106.0)
    state.release_controller("j1", os.getpid())
    assert state.job("j1").controller_pid is None

    other = subprocess.Popen(["sleep", "30"])  # a live process that is not spotrun: a reused pid
    _until_exec_done(other.pid)
    try:
        assert state.claim_controller("j1", other.pid, 200.0, stale_after=10)
        assert not state.claim_controller("j1", 1, 205.0, stale_after=10)  # fresh: kept
        assert state.claim_controller("j1", 1, 300.0, stale_after=10)  # quiet and not spotrun: taken over
    finally:
        other.kill()
        other.wait()
    dead = subprocess.Popen(["true"])
    dead.wait()
    state.release_controller("j1", 1)
    assert state.claim_controller("j1", dead.pid, 400.0, stale_after=10)
    assert state.claim_controller("j1", os.getpid(), 401.0, stale_after=10)  # its holder is dead: taken over


def test_a_busy_spotrun_controller_keeps_the_job_even_when_quiet(tmp_path):
    import subprocess
    import sys

    state = State(tmp_path / "s.db")
    make_job(state)
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "spotrun-controller-stand-in"])
    try:
        assert state.claim_controller("j1", busy.pid, 100.0, stale_after=10)
        assert not state.claim_controller("j1", 1, 1000.0, stale_after=10)  # quiet, but still spotrun
    finally:
        busy.kill()
        busy.wait()
    assert state.claim_controller("j1", 1, 1001.0, stale_after=10)


def _writer(path: str, job: str, count: int) -> None:
    state = State(path)
    for i in range(count):
        state.add_event(job, float(i), "tick", f"{job} {i}")


def test_two_processes_write_at_once(tmp_path):
    path = tmp_path / "s.db"
    state = State(path)
    make_job(state, "a")
    make_job(state, "b")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), j, 200)) for j in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len([e for e in state.events("a") if e.kind == "tick"]) == 200
    assert len([e for e in state.events("b") if e.kind == "tick"]) == 200


def test_a_version_1_database_is_migrated_keeping_its_rows(tmp_path):
    from spotrun.control.state import MIGRATIONS

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[1])
    db.execute(
        "INSERT INTO jobs (id, name, status, spec_json, store_url, created_at, updated_at)"
        " VALUES ('old', 'old', 'SUCCEEDED', '{}', 'file:///s', 1, 2)"
    )
    db.execute(
        "INSERT INTO attempts (job_id, n, status, provider, region, zone, instance_type, spot, offer_key,"
        " hourly_price, client_token, created_at) VALUES ('old', 1, 'ENDED', 'local', 'r', 'z', 't', 1, 'k', 1.0,"
        " 'old-a1', 1)"
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    state = State(path)
    assert state.schema_version == SCHEMA_VERSION == 2
    assert state.job("old").status == JobStatus.SUCCEEDED
    assert state.attempt("old", 1).store_url is None
    make_job(state, "new")
    assert begin(state, "new").store_url is None
