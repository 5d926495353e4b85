"""The Agent: fetch, run, ship, react to notices, exit -- on a LocalStore with a tiny workload."""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import pytest

from spotrun.agent import jobfile
from spotrun.agent.jobfile import AgentJob, DataItem
from spotrun.agent.main import EXIT_PREEMPTED, Agent, load_boot
from spotrun.agent.sync import CheckpointUploader, LogShipper, restore_latest
from spotrun.agent.workload import Workload
from spotrun.bundle import pack_dir, pack_path
from spotrun.clock import FakeClock
from spotrun.clouds.base import Boot
from spotrun.clouds.local.launcher import agent_processes, kill_agent, spawn_agent
from spotrun.clouds.local.notice import LocalNotice
from spotrun.clouds.store import LocalStore, Store

COUNTER = Path(__file__).parent / "fixtures" / "counter.py"
PREFIX = "jobs/j1"


def counter(*args: object) -> str:
    return shlex.join([sys.executable, str(COUNTER), *map(str, args)])


class RecordingStore(LocalStore):
    """A LocalStore that remembers the order of writes (to check manifest-last and heartbeats)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []
        self._wlock = threading.Lock()

    def _write(self, key, writer, *, if_absent=False):  # type: ignore[no-untyped-def]
        done = super()._write(key, writer, if_absent=if_absent)
        with self._wlock:
            self.writes.append(key)
        return done


def make_job(store: Store, tmp: Path, run: str, **kw: object) -> AgentJob:
    job = AgentJob(
        job_id="j1", name="test", run=run, heartbeat_interval=0.1, log_flush_interval=0.1, upload_budget=0.5, **kw
    )  # type: ignore[arg-type]
    store.put_bytes(jobfile.job_key(PREFIX), job.to_json().encode())
    return job


def boot_for(store: Store, notice_path: Path | None, attempt: int = 1) -> Boot:
    notice = {"kind": "local", "path": str(notice_path), "poll_interval": 0.05} if notice_path else {}
    return Boot(job_id="j1", attempt=attempt, store_url=store.url, job_prefix=PREFIX, notice=notice)


def store_ckpt(store: Store, step: int, *, torn: bool = False, corrupt: bool = False) -> None:
    """A checkpoint in the store as an earlier attempt would have uploaded it."""
    import hashlib

    state = json.dumps({"step": step}).encode()
    base = f"{jobfile.checkpoints_prefix(PREFIX)}{step:012d}/"
    store.put_bytes(base + "state.json", b"garbage" if corrupt else state)
    if not torn:
        files = {"state.json": {"size": len(state), "sha256": hashlib.sha256(state).hexdigest()}}
        manifest = {"format": 1, "step": step, "created": 0, "files": files}
        store.put_bytes(base + "MANIFEST.json", json.dumps(manifest).encode())


def read_log(store: Store, attempt: int = 1) -> str:
    keys = store.list(jobfile.log_prefix(PREFIX, attempt))
    return b"".join(store.get_bytes(k) for k in keys).decode()


def exit_record(store: Store, attempt: int = 1) -> dict:
    return json.loads(store.get_bytes(jobfile.exit_key(PREFIX, attempt)))


def complete_steps(store: Store) -> list[int]:
    keys = store.list(jobfile.checkpoints_prefix(PREFIX))
    return sorted(int(k.split("/")[3]) for k in keys if k.endswith("/MANIFEST.json"))


def notice_when(progress_file: Path, notice_file: Path, at_step: int, seconds: float) -> threading.Thread:
    """Write a local-market notice once the workload reports `at_step`."""

    def watch() -> None:
        for _ in range(2000):
            try:
                if json.loads(progress_file.read_text())["step"] >= at_step:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        notice_file.write_text(json.dumps({"deadline": time.time() + seconds}))

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


# --------------------------------------------------------------------------- contracts


def test_jobfile_round_trip_and_validation() -> None:
    job = AgentJob(job_id="j", name="n", run="python t.py", data=[DataItem("k", "d", "store")], env={"A": "1"})
    back = AgentJob.from_json(job.to_json())
    assert back == job
    with pytest.raises(ValueError):
        DataItem("k", "../up")
    with pytest.raises(ValueError):
        AgentJob.from_json(json.dumps({"format": 99, "job_id": "j", "name": "n", "run": "x"}))
    assert jobfile.log_key("jobs/x", 2, 7) == "jobs/x/attempts/2/log/00000007"


def test_boot_can_be_given_as_json_b64_or_script() -> None:
    from spotrun.clouds.base import render_bootstrap_script

    boot = Boot(job_id="j", attempt=3, store_url="file:///s", job_prefix="jobs/j")
    for text in (json.dumps(boot.__dict__), boot.to_b64(), render_bootstrap_script(boot)):
        assert load_boot(text) == boot


def test_local_notice(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    w = LocalNotice(str(tmp_path / "n.json"), clock=clock)
    assert w.check() is None
    (tmp_path / "n.json").write_text("{not json")
    assert w.check() is None
    (tmp_path / "n.json").write_text(json.dumps({"deadline": 1030.0}))
    assert w.check() == 30.0
    clock.advance(40)
    assert w.check() == 0.0


# --------------------------------------------------------------------------- shipping


def test_log_shipper_keeps_lines_whole_and_in_order(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    log = LogShipper(store, PREFIX, 1)
    log.feed(b"one\ntw")
    assert log.flush() == 1
    log.feed(b"o\nthree")
    log.note("hello")
    log.flush()
    log.feed(b"tail without newline")
    log.flush(final=True)
    chunks = [store.get_bytes(k) for k in store.list(jobfile.log_prefix(PREFIX, 1))]
    assert chunks[0] == b"one\n" and chunks[1] == b"two\nthree\n[spotrun-agent] hello\n"
    assert b"".join(chunks).endswith(b"tail without newline")
    # a second shipper for the same attempt continues the sequence instead of overwriting
    again = LogShipper(store, PREFIX, 1)
    again.feed(b"more\n")
    again.flush()
    assert read_log(store).endswith("tail without newlinemore\n")


def test_log_shipper_keeps_bytes_when_a_write_fails(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    log = LogShipper(store, PREFIX, 1)
    real = store.put_bytes
    store.put_bytes = lambda *a, **k: (_ for _ in ()).throw(OSError("down"))  # type: ignore[method-assign]
    log.feed(b"a\n")
    with pytest.raises(OSError):
        log.flush()
    store.put_bytes = real  # type: ignore[method-assign]
    log.feed(b"b\n")
    log.flush()
    assert read_log(store) == "a\nb\n"


def test_restore_skips_torn_and_corrupt_checkpoints(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store_ckpt(store, 10)
    store_ckpt(store, 20, corrupt=True)
    store_ckpt(store, 30, torn=True)
    notes: list[str] = []
    dest = tmp_path / "ck"
    dest.mkdir()
    assert restore_latest(store, PREFIX, dest, notes.append) == 10
    assert sorted(p.name for p in dest.iterdir()) == ["000000000010"]
    assert any("torn" in n for n in notes) and any("does not match" in n for n in notes)
    assert restore_latest(LocalStore(tmp_path / "empty"), PREFIX, dest, notes.append) is None


def _local_ckpt(root: Path, step: int) -> None:
    sys.path.insert(0, str(COUNTER.parent))
    try:
        import counter as fixture
    finally:
        sys.path.pop(0)
    fixture.save(root, step, 100)


def test_uploader_writes_manifest_last_and_prunes(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "s")
    store_ckpt(store, 1, torn=True)  # an old torn upload: pruned once newer ones exist
    local = tmp_path / "ck"
    up = CheckpointUploader(store, PREFIX, local, keep=2, note=lambda _: None)
    assert up.sync_once() is None
    for step in (5, 10, 15):
        _local_ckpt(local, step)
        store.writes.clear()
        assert up.sync_once() == step
        mine = [k for k in store.writes if f"/{step:012d}/" in k]
        assert mine[-1].endswith("MANIFEST.json") and len(mine) == 3
    assert up.sync_once() is None  # nothing new
    assert complete_steps(store) == [10, 15]
    assert not store.list(f"{jobfile.checkpoints_prefix(PREFIX)}000000000001/")
    # a checkpoint whose files do not match its manifest is never uploaded
    _local_ckpt(local, 20)
    (local / "000000000020" / "state.json").write_text("tampered")
    assert up.sync_once() is None and complete_steps(store) == [10, 15]


# --------------------------------------------------------------------------- timing (fake clock)


class StubbornWorkload(Workload):
    """Ignores SIGTERM: the Agent must SIGKILL it at notice - upload budget."""

    def __init__(self, clock: FakeClock) -> None:
        read, write = os.pipe()
        os.close(write)
        self.output = os.fdopen(read, "rb")
        self.clock = clock
        self.events: list[tuple[str, float]] = []
        self._alive = True

    def exit_code(self) -> int | None:
        return None if self._alive else -9

    def alive(self) -> bool:
        return self._alive

    def terminate(self) -> None:
        self.events.append(("TERM", self.clock.now()))

    def kill(self) -> None:
        if self._alive:
            self.events.append(("KILL", self.clock.now()))
        self._alive = False


def test_notice_gives_the_workload_notice_minus_budget_then_sigkill(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    make_job(store, tmp_path, "unused")
    clock = FakeClock(5000.0)
    notice = tmp_path / "notice.json"
    watcher = LocalNotice(str(notice), poll_interval=1.0, clock=clock)
    stub = StubbornWorkload(clock)

    class TestAgent(Agent):
        def _start(self) -> Workload:
            notice.write_text(json.dumps({"deadline": clock.now() + 30.0}))
            return stub

    agent = TestAgent(boot_for(store, None), tmp_path / "root", clock=clock, watcher=watcher, tick=0.5)
    assert agent.run() == EXIT_PREEMPTED
    assert stub.events == [("TERM", 5000.0), ("KILL", 5000.0 + 30.0 - 0.5)]  # upload_budget 0.5
    rec = exit_record(store)
    assert rec["reason"] == "preempted" and rec["code"] == 137
    given = json.loads((tmp_path / "root" / "meta" / "notice.json").read_text())
    assert given["seconds_left"] == pytest.approx(29.5) and given["instance_deadline"] == 5030.0
    assert watcher.acknowledged


# --------------------------------------------------------------------------- end to end (real processes)


def test_full_run_fetches_everything_and_ships_logs_heartbeats_outputs(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "s")
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.sh").write_text(counter("--total", 12, "--every", 4, "--data", "one/file.txt") + "\n")
    (work / ".gitignore").write_text("junk/\n")
    (work / "junk").mkdir()
    (work / "junk" / "x").write_text("never shipped")
    bundle = pack_dir(work)
    bundle_key = f"{PREFIX}/bundle/{bundle.sha256}.tar.gz"
    store.put_file(bundle_key, bundle.path)
    (tmp_path / "file.txt").write_text("hello data\n")
    single = pack_path(tmp_path / "file.txt")
    store.put_file(f"{PREFIX}/data/{single.sha256}.tar.gz", single.path)
    bucket = LocalStore(tmp_path / "bucket")
    bucket.put_bytes("set/a.txt", b"A")
    bucket.put_bytes("set/sub/b.txt", b"B")
    data = [
        DataItem(f"{PREFIX}/data/{single.sha256}.tar.gz", "one/file.txt", "store"),
        DataItem(f"{bucket.url}/set", "remote", "url"),
    ]
    store_ckpt(store, 4)
    store_ckpt(store, 8, torn=True)  # the newest in the store is torn: resume from 4
    make_job(store, tmp_path, "bash train.sh", bundle=bundle_key, data=data, setup="echo setting up; test -f train.sh")
    root = tmp_path / "root"
    code = Agent(boot_for(store, tmp_path / "notice.json"), root, store=store).run()
    assert code == 0
    log = read_log(store)
    assert "setting up" in log and "resumes at 4" in log and "data: hello data" in log
    steps = [int(line.split()[1]) for line in log.splitlines() if line.startswith("step ")]
    assert steps == list(range(5, 13))
    assert (root / "data" / "remote" / "sub" / "b.txt").read_text() == "B"
    assert not (root / "work" / "junk").exists()
    # the newest committed one is uploaded; 8 only if the uploader saw it before 12 superseded it
    assert complete_steps(store) in ([4, 8, 12], [4, 12])
    assert store.get_bytes(f"{PREFIX}/outputs/result.txt") == b"done at 12\n"
    rec = exit_record(store)
    assert rec["reason"] == "completed" and rec["code"] == 0 and rec["checkpoint_step"] == 12
    beats = [k for k in store.writes if k.endswith("/heartbeat")]
    assert len(beats) >= 2
    last = json.loads(store.get_bytes(jobfile.heartbeat_key(PREFIX, 1)))
    assert last["progress"]["step"] == 12 and last["checkpoint_step"] == 12
    assert store.writes.index(jobfile.exit_key(PREFIX, 1)) == len(store.writes) - 1  # exit written last


@pytest.mark.parametrize(
    ("setup", "run", "code", "phase"),
    [
        (None, counter("--total", 10, "--fail-at", 3), 3, "running"),
        ("echo broken; exit 7", "echo never", 7, "setup"),
    ],
)
def test_failures_propagate_exit_code_and_phase(
    tmp_path: Path, setup: str | None, run: str, code: int, phase: str
) -> None:
    store = LocalStore(tmp_path / "s")
    make_job(store, tmp_path, run, setup=setup)
    assert Agent(boot_for(store, None), tmp_path / "root").run() == code
    rec = exit_record(store)
    assert rec == {**rec, "reason": "failed", "code": code, "phase": phase}
    assert "never" not in read_log(store).replace("echo never", "")
    assert not store.list(jobfile.outputs_prefix(PREFIX))


def test_missing_bundle_is_an_agent_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    make_job(store, tmp_path, "true", bundle=f"{PREFIX}/bundle/{'0' * 64}.tar.gz")
    assert Agent(boot_for(store, None), tmp_path / "root").run() == 70
    rec = exit_record(store)
    assert rec["reason"] == "agent-error" and rec["code"] is None and "NotFound" in rec["error"]


def test_preemption_end_to_end_in_a_separate_agent_process(tmp_path: Path) -> None:
    """Notice -> notice file -> SIGTERM through a shell to Python -> checkpoint saved at the next
    step -> uploaded -> exit record 'preempted' -> resumed by the next attempt without a lost step."""
    store = LocalStore(tmp_path / "s")
    # `bash` runs python as a child and dies of the SIGTERM first: the Agent must wait for python
    run = "echo begin; " + counter("--total", 400, "--every", 1000, "--step-time", 0.01) + "; echo after"
    make_job(store, tmp_path, run)
    notice = tmp_path / "notice.json"
    root = tmp_path / "root1"
    started = time.time()
    proc = spawn_agent(boot_for(store, notice), root, log_path=tmp_path / "agent.log")
    watcher = notice_when(root / "meta" / "progress.json", notice, at_step=30, seconds=3.0)
    assert proc.wait(timeout=20) == EXIT_PREEMPTED
    watcher.join()
    assert time.time() - started < 15
    rec = exit_record(store)
    assert rec["reason"] == "preempted", read_log(store)
    deadline = json.loads(notice.read_text())["deadline"]
    assert rec["at"] <= deadline  # everything done inside the notice window
    log = read_log(store)
    saved = int(log.split("saved step ")[1].split()[0])
    assert rec["checkpoint_step"] == saved and complete_steps(store) == [saved]
    assert "after" not in log.replace("; echo after", "")
    assert agent_processes(proc.pid) == []  # nothing left behind

    # the next attempt, on a fresh "instance", resumes from the uploaded checkpoint
    run2 = counter("--total", saved + 5, "--every", 1000)
    make_job(store, tmp_path, run2)
    assert Agent(boot_for(store, tmp_path / "n2.json", attempt=2), tmp_path / "root2").run() == 0
    log2 = read_log(store, 2)
    assert f"resumes at {saved}" in log2 and f"step {saved + 1}\n" in log2


def test_hard_kill_leaves_no_process_behind(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    make_job(store, tmp_path, "sleep 60 & " + counter("--total", 100000, "--step-time", 0.01))
    root = tmp_path / "root"
    proc = spawn_agent(boot_for(store, None), root)
    for _ in range(500):
        if (root / "meta" / "progress.json").exists():
            break
        time.sleep(0.01)
    members = agent_processes(proc.pid)
    assert len(members) >= 3, members  # agent, shell/python, sleep
    kill_agent(proc.pid, root)
    proc.wait(timeout=5)
    for _ in range(100):
        if not agent_processes(proc.pid):
            break
        time.sleep(0.02)
    assert agent_processes(proc.pid) == []
    assert all(_state(pid) in ("gone", "Z") for pid in members)


def _state(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return text[text.rfind(")") + 2 :].split()[0]


def test_agent_sigterm_acts_as_short_notice_and_reaps_stragglers(tmp_path: Path) -> None:
    """SIGTERM to the Agent: the workload gets SIGTERM and time to save; a TERM-ignoring
    background child is SIGKILLed at the deadline; the exit record says 'terminated'."""
    store = LocalStore(tmp_path / "s")
    run = "trap '' TERM; sleep 60 & " + counter("--total", 100000, "--step-time", 0.01, "--every", 1000)
    job = make_job(store, tmp_path, run)
    job.upload_budget = 0.0
    store.put_bytes(jobfile.job_key(PREFIX), job.to_json().encode())
    root = tmp_path / "root"
    proc = spawn_agent(boot_for(store, None), root, env={"SPOTRUN_TERMINATE_GRACE": "1.5"})
    for _ in range(500):
        if (root / "meta" / "progress.json").exists():
            break
        time.sleep(0.01)
    start = time.time()
    proc.terminate()
    assert proc.wait(timeout=20) == EXIT_PREEMPTED
    elapsed = time.time() - start
    assert 1.5 <= elapsed < 8  # waited for the straggler until the grace ran out, then killed it
    rec = exit_record(store)
    assert rec["reason"] == "terminated" and rec["checkpoint_step"] is not None
    assert agent_processes(proc.pid) == []


def test_stray_background_processes_do_not_outlive_the_workload(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    pidfile = tmp_path / "stray.pid"
    make_job(store, tmp_path, f"sleep 60 & echo $! > {pidfile}; echo main done")
    started = time.time()
    assert Agent(boot_for(store, None), tmp_path / "root", store=store).run() == 0
    assert time.time() - started < 10
    assert _state(int(pidfile.read_text())) in ("gone", "Z")
    assert "main done" in read_log(store)
