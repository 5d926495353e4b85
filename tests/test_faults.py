"""Fault injection (issue 13): hostile or broken store contents, a failing store, crashes at the
worst moments. Nothing crashes the controller, nothing finished is re-run, nothing committed is
lost, nothing is used that was not verified."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import subprocess
from pathlib import Path

import pytest

from spotrun.agent.fetch import AgentFailure, fetch_bundle, fetch_store_data
from spotrun.agent.sync import CheckpointUploader, restore_latest
from spotrun.bundle import pack_dir, pack_path
from spotrun.checkpoint.format import MANIFEST_NAME, latest_checkpoint, write_manifest
from spotrun.clouds.base import Boot, render_bootstrap_script
from spotrun.clouds.store import LocalStore
from spotrun.control.records import ExitRecord, Heartbeat
from spotrun.control.state import JobStatus
from tests.test_controller import ScriptedProvider, make, offer

pytestmark = pytest.mark.faults
DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    from spotrun.clock import FakeClock
    from spotrun.control.state import State

    return State(tmp_path / "state.db"), LocalStore(tmp_path / "store"), FakeClock()


# --------------------------------------------------------------------------- exit records


class RawExitProvider(ScriptedProvider):
    """Outcome ("raw", bytes): the instance exits having written these exact bytes as its record."""

    def poll(self, instance):  # type: ignore[no-untyped-def]
        from spotrun.clouds.base import InstanceState, InstanceStatus

        outcome, boot = self.fate[instance.instance_id]
        fake = self._find(instance.instance_id)
        if fake.alive and isinstance(outcome, tuple) and outcome[0] == "raw":
            self.store.put_bytes(f"jobs/{boot.job_id}/attempts/{boot.attempt}/exit", outcome[1])
            return InstanceState(InstanceStatus.EXITED, exit_code=outcome[2] if len(outcome) > 2 else None)
        return super().poll(instance)


def _make_raw(env, script, restarts=0):  # type: ignore[no-untyped-def]
    controller, provider, job = make(env, script, [offer("a", 1.0)], restarts=restarts)
    raw = RawExitProvider(provider.store, script, provider.clock)
    controller.providers["scripted"] = raw
    return controller, raw, job


@pytest.mark.parametrize(
    "record",
    [b'{"code": "oops", "reason": "completed"}', b"[1, 2]", b"null", b"\xff\xfe", DEEP, b'{"code": 1e999}', b"{"],
)
def test_a_malformed_exit_record_never_crashes_the_controller(env, record: bytes) -> None:
    controller, provider, job = _make_raw(env, {"a": [("raw", record), ("exit", 0)]})
    result = controller.run(job)  # raised TypeError/ValueError/RecursionError on the old code
    assert result.status == JobStatus.SUCCEEDED
    first = env[0].attempts(job)[0]
    assert first.end_reason == "agent_error"  # not counted against max_restarts 0
    assert provider.list_owned(job) == []


def test_exit_record_and_heartbeat_parsing_is_typed() -> None:
    assert ExitRecord.parse(b'{"code": 0, "reason": "completed", "checkpoint_step": "[/x]"}').checkpoint_step is None
    assert ExitRecord.parse(b'{"code": true, "reason": "failed"}').reason == "malformed"
    rec = ExitRecord.parse(b'{"code": 70, "reason": "agent-error", "kind": "store", "error": "EROFS"}')
    assert rec.infrastructure and rec.kind == "store"
    assert Heartbeat.parse(DEEP) is None
    beat = Heartbeat.parse(b'{"at": 5, "progress": {"step": 3, "total": "x", "evil": [1]}}')
    assert beat is not None and beat.progress == {"step": 3}


def test_a_job_whose_attempt_completed_is_finished_not_rerun_after_a_crash(env) -> None:
    state, _, clock = env
    controller, provider, job = make(env, {"a": [("exit", 0)]}, [offer("a", 1.0)])
    # the previous controller saw "completed", ended the attempt, and died before SUCCEEDED
    attempt = state.begin_attempt(job, provider="scripted", region="r1", zone="a", instance_type="gpu1", spot=True,
                                  offer_key=offer("a", 1.0).key, hourly_price=1.0, ondemand_price=4.0, time_scale=1.0,
                                  now=clock.now())  # fmt: skip
    state.attempt_started(job, attempt.n, "i-0", {}, clock.now())
    state.end_attempt(job, attempt.n, "completed", clock.now(), exit_code=0)
    result = controller.run(job)
    assert result.status == JobStatus.SUCCEEDED
    assert provider.calls == 0  # the old code launched attempt 2 and ran the workload again
    assert len(state.attempts(job)) == 1


def test_infrastructure_failures_are_retried_with_backoff_and_end_naming_the_store(env) -> None:
    bad = json.dumps({"code": None, "reason": "agent-error", "kind": "store", "error": "[Errno 30] Read-only"})
    controller, provider, job = _make_raw(env, {"a": [("raw", bad.encode(), 70)] * 6}, restarts=0)
    start = provider.clock.now()
    result = controller.run(job)
    assert result.status == JobStatus.FAILED
    assert "store" in result.reason and env[1].url in result.reason and "Read-only" in result.reason
    assert "workload exited" not in result.reason
    ends = [a.end_reason for a in env[0].attempts(job)]
    assert ends == ["agent_error"] * 4  # 1 + INFRA_RETRIES, never "failed"
    assert provider.clock.now() - start >= 5 + 10 + 20  # growing pauses between them


def test_an_agent_error_then_success_does_not_use_up_max_restarts(env) -> None:
    bad = b'{"code": 70, "reason": "agent-error", "kind": "bundle", "error": "corrupt"}'
    controller, _, job = _make_raw(env, {"a": [("raw", bad), ("exit", 0)]}, restarts=0)
    assert controller.run(job).status == JobStatus.SUCCEEDED  # FAILED on the old code


# --------------------------------------------------------------------------- checkpoints


def _checkpoint(folder: Path, step: int, payload: bytes) -> Path:
    path = folder / f"{step:012d}"
    path.mkdir(parents=True)
    (path / "state.bin").write_bytes(payload)
    write_manifest(path, step, {"state.bin": (len(payload), hashlib.sha256(payload).hexdigest())})
    return path


def _to_store(store: LocalStore, job_prefix: str, path: Path) -> None:
    for f in sorted(path.iterdir(), key=lambda p: p.name == MANIFEST_NAME):  # manifest last
        store.put_file(f"{job_prefix}/checkpoints/{path.name}/{f.name}", f)


@pytest.mark.parametrize("seed", range(24))
def test_torn_or_corrupt_checkpoints_are_never_loaded(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "src"
    good = rng.randbytes(4096)
    _to_store(store, "jobs/j", _checkpoint(src, 10, good))
    newer = _checkpoint(src, 20, rng.randbytes(4096))
    target = newer / ("state.bin" if seed % 2 else MANIFEST_NAME)
    data = bytearray(target.read_bytes())
    offset = rng.randrange(len(data.rstrip()))
    if seed % 3 == 0 or target.name == MANIFEST_NAME:
        data = data[:offset]  # torn: truncated at a random offset (a manifest bit flip may be harmless)
    else:
        data[offset] ^= 1 << rng.randrange(8)  # one flipped bit
    target.write_bytes(bytes(data))
    _to_store(store, "jobs/j", newer)
    # and a newest one whose manifest is 200,000 levels deep
    deep = src / f"{30:012d}"
    deep.mkdir()
    (deep / MANIFEST_NAME).write_bytes(DEEP)
    _to_store(store, "jobs/j", deep)
    notes: list[str] = []
    dest = tmp_path / "restore"
    assert restore_latest(store, "jobs/j", dest, notes.append) == 10  # RecursionError on the old code
    assert (dest / f"{10:012d}" / "state.bin").read_bytes() == good
    assert latest_checkpoint(src).name == f"{10:012d}"  # the library's own restore falls back the same way


# --------------------------------------------------------------------------- verified fetch


def test_a_poisoned_data_archive_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.txt").write_text("good labels\n")
    packed = pack_path(tmp_path / "data")
    key = f"data/{packed.sha256}.tar.gz"
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "labels.txt").write_text("poisoned labels\n")
    store.put_file(key, pack_path(tmp_path / "evil").path)  # swapped behind the controller's back
    with pytest.raises(AgentFailure) as err:
        fetch_store_data(store, key, tmp_path / "out", tmp_path)
    assert err.value.kind == "data" and "sha256" in str(err.value)
    assert not (tmp_path / "out").exists()  # the old code unpacked it and the job "SUCCEEDED"
    with pytest.raises(AgentFailure):  # a key not named by a sha256 is not trusted either
        fetch_store_data(store, "data/whatever.tar.gz", tmp_path / "out", tmp_path)


def test_a_poisoned_code_bundle_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "train.py").write_text("print('hi')\n")
    packed = pack_dir(tmp_path / "w")
    key = f"jobs/j/bundle/{packed.sha256}.tar.gz"
    store.put_bytes(key, b"not the bundle")
    with pytest.raises(AgentFailure) as err:
        fetch_bundle(store, key, tmp_path / "work", tmp_path)
    assert err.value.kind == "bundle"


def test_a_poisoned_agent_package_is_not_installed(tmp_path: Path) -> None:
    good = tmp_path / "good.tar.gz"
    good.write_bytes(b"the package the controller built")
    boot = Boot("j", 1, "s3://b", "jobs/j", spotrun_package="s3://b/agent/x.tar.gz",
                spotrun_package_sha256=hashlib.sha256(good.read_bytes()).hexdigest())  # fmt: skip
    script = render_bootstrap_script(boot)
    lines = [line for line in script.splitlines() if line.startswith(("PKG", "verify_agent()"))]
    assert len(lines) == 3
    agent = tmp_path / "agent.tar.gz"

    def verified(content: bytes) -> bool:
        agent.write_bytes(content)
        shell = "\n".join([*lines, f"AGENT={agent}", "verify_agent"])
        return subprocess.run(["bash", "-c", shell], check=False).returncode == 0

    assert verified(good.read_bytes())
    assert not verified(b"a swapped package")  # falls back to the package index instead


def test_the_controller_reuploads_a_content_addressed_key_holding_other_bytes(env, tmp_path: Path) -> None:
    from spotrun.control.submitting import upload_verified

    store = env[1]
    src = tmp_path / "x.bin"
    src.write_bytes(b"right")
    digest = hashlib.sha256(b"right").hexdigest()
    store.put_bytes(f"data/{digest}.tar.gz", b"wrong")  # same size, other bytes
    upload_verified(store, f"data/{digest}.tar.gz", src, 5, digest, "data")
    assert store.get_bytes(f"data/{digest}.tar.gz") == b"right"


# --------------------------------------------------------------------------- failing stores


class FailingStore(LocalStore):
    """A LocalStore that raises `errno_` on writes after `budget` successful ones (full, read-only)."""

    def __init__(self, root: Path, errno_: int, budget: int) -> None:
        super().__init__(root)
        self.errno_, self.budget = errno_, budget

    def _write(self, key, writer, *, if_absent=False):  # type: ignore[no-untyped-def]
        if self.budget <= 0:
            raise OSError(self.errno_, "injected")
        self.budget -= 1
        return super()._write(key, writer, if_absent=if_absent)


@pytest.mark.parametrize("budget", [0, 1, 2])
def test_a_full_store_leaves_no_half_uploaded_step(tmp_path: Path, budget: int) -> None:
    src = tmp_path / "ckpt"
    path = src / f"{5:012d}"
    path.mkdir(parents=True)
    files = {}
    for name in ("a.bin", "b.bin", "c.bin"):
        (path / name).write_bytes(name.encode() * 100)
        files[name] = (500, hashlib.sha256(name.encode() * 100).hexdigest())
    write_manifest(path, 5, files)
    store = FailingStore(tmp_path / "store", errno.ENOSPC, budget)
    up = CheckpointUploader(store, "jobs/j", src, note=lambda _: None)
    with pytest.raises(OSError):
        up.sync_once()
    assert store.list("jobs/j/checkpoints/") == []  # the old code left the files of a torn step
    assert not (store.root / "jobs" / "j" / "checkpoints" / f"{5:012d}").exists()


def test_pruning_leaves_no_empty_step_folders(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("jobs/j/checkpoints/000000000001/x", b"1")
    store.delete("jobs/j/checkpoints/000000000001/x")
    assert not (store.root / "jobs" / "j" / "checkpoints").exists()
    assert store.root.exists()


def test_an_agent_on_a_read_only_store_ends_with_an_agent_error_not_a_traceback(tmp_path: Path) -> None:
    from spotrun.agent.jobfile import AgentJob
    from spotrun.agent.main import EXIT_AGENT_ERROR, Agent

    root = tmp_path / "store"
    LocalStore(root).put_bytes("jobs/j/job.json", AgentJob(job_id="j", name="j", run="true").to_json().encode())
    store = FailingStore(root, errno.EROFS, 0)
    boot = Boot("j", 1, store.url, "jobs/j")
    agent = Agent(boot, tmp_path / "agent", store=store, watcher=None)
    assert agent.run() == EXIT_AGENT_ERROR  # the old code raised OSError out of run()


def test_old_saved_specs_the_validator_now_refuses_are_still_readable() -> None:
    from spotrun.control.specs import planning_spec

    spec = planning_spec({"name": "x", "run": "t", "deadline": float("inf"), "resources": {"memory": "1e400GB"}})
    assert spec.deadline is None and spec.name == "x"  # cancel/resume/status can still rebuild it


def test_submitting_to_a_read_only_store_names_the_store(env, tmp_path: Path) -> None:
    from spotrun.clouds.store import StoreError
    from spotrun.control.controller import Controller
    from spotrun.spec import load_spec

    state, store, clock = env
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "train.py").write_text("print(1)\n")
    (tmp_path / "job.yaml").write_text("name: ro\nrun: python train.py\nworkdir: w\n")
    controller = Controller(state, store_url=store.url, clock=clock)
    controller._stores[store.url] = FailingStore(store.root, errno.EROFS, 0)
    with pytest.raises(StoreError, match=f"store {store.url}"):
        controller.submit(load_spec(tmp_path / "job.yaml"))
    assert state.jobs() == []  # nothing half-recorded


def test_an_agent_that_could_not_write_its_record_is_an_infrastructure_failure(env) -> None:
    class NoRecord(ScriptedProvider):
        def poll(self, instance):  # type: ignore[no-untyped-def]
            from spotrun.clouds.base import InstanceState, InstanceStatus

            outcome, _ = self.fate[instance.instance_id]
            if self._find(instance.instance_id).alive and outcome == "ro":
                return InstanceState(InstanceStatus.EXITED, exit_code=70)  # the store refused the record
            return super().poll(instance)

    controller, provider, job = make(env, {"a": ["ro", ("exit", 0)]}, [offer("a", 1.0)], restarts=0)
    controller.providers["scripted"] = NoRecord(provider.store, provider.script, provider.clock)
    assert controller.run(job).status == JobStatus.SUCCEEDED  # not "workload exited with code 70"
    assert env[0].attempts(job)[0].end_reason == "agent_error"
    assert "read-only or full" in env[0].attempts(job)[0].detail


def test_a_job_saved_with_a_spec_this_version_refuses_can_still_be_cancelled(env) -> None:
    state, store, clock = env
    controller, provider, job = make(env, {"a": ["run"]}, [offer("a", 1.0)])
    saved = state.job(job).spec
    saved["deadline"] = float("inf")  # what an older spotrun stored for `deadline: "1e400s"`
    saved["resources"] = {**(saved.get("resources") or {}), "memory": "1e400GB"}
    state._db.execute("UPDATE jobs SET spec_json = ? WHERE id = ?", (json.dumps(saved), job))
    state.request_cancel(job, clock.now())
    result = controller.run(job)  # the old code raised SpecError here, for cancel and resume alike
    assert result.status == JobStatus.CANCELLED


def test_a_store_move_recopies_a_blob_the_target_holds_with_other_bytes(tmp_path: Path) -> None:
    from spotrun.control.transfer import move_job

    src, dst = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "train.py").write_text("print(1)\n")
    packed = pack_dir(tmp_path / "w")
    key = f"jobs/j/bundle/{packed.sha256}.tar.gz"
    src.put_file(key, packed.path)
    from spotrun.agent.jobfile import AgentJob

    src.put_bytes("jobs/j/job.json", AgentJob(job_id="j", name="j", run="t", bundle=key).to_json().encode())
    dst.put_bytes(key, bytes(packed.size))  # same size, other bytes: the old code skipped it
    move_job(src, dst, "j")
    assert dst.get_bytes(key) == packed.path.read_bytes()


def test_a_workload_that_completed_as_its_instance_was_preempted_is_not_run_again(env) -> None:
    """Found by the SIGKILL suite: the exit record said "completed", the instance was gone by the
    next poll (its notice ran out), and the old controller relaunched it as a preemption."""

    class CompletedThenPreempted(ScriptedProvider):
        def poll(self, instance):  # type: ignore[no-untyped-def]
            from spotrun.clouds.base import InstanceState, InstanceStatus

            outcome, boot = self.fate[instance.instance_id]
            if self._find(instance.instance_id).alive and outcome == "late-notice":
                record = b'{"code": 0, "reason": "completed", "checkpoint_step": 30}'
                self.store.put_bytes(f"jobs/{boot.job_id}/attempts/{boot.attempt}/exit", record)
                return InstanceState(InstanceStatus.PREEMPTED, reason="spot interruption")
            return super().poll(instance)

    controller, provider, job = make(env, {"a": ["late-notice", ("exit", 0)]}, [offer("a", 1.0)])
    controller.providers["scripted"] = CompletedThenPreempted(provider.store, provider.script, provider.clock)
    result = controller.run(job)
    assert result.status == JobStatus.SUCCEEDED
    assert [a.end_reason for a in env[0].attempts(job)] == ["completed"]  # old: ["preempted", "completed"]
