"""The controller SIGKILLed at seeded points across a job's life (issue 13): while launching,
while the workload runs, during a preemption notice, while relaunching, right after the
workload completed and during the final output upload. A new controller (`python -m
spotrun.control.controller JOB`, what `launch --detach` starts) then resumes the job.

Every job must end SUCCEEDED with outputs and final checkpoint bitwise equal to an uninterrupted
run, never with two instances or two open attempts at once, and never with the workload run again
after it completed. Real local provider (hypervisor + Agent processes), real SQLite and store;
the workload is tests/fixtures/counter.py (no torch: seconds per job)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spotrun.clouds.base import Instance
from spotrun.clouds.local.provider import LocalProvider
from spotrun.clouds.store import LocalStore, open_store
from spotrun.control.controller import Controller
from spotrun.control.state import JobStatus, State
from spotrun.spec import load_spec

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
COUNTER = ROOT / "tests" / "fixtures" / "counter.py"
TOTAL = 40
MARKET = """
name: kill
time_scale: 60
notice: 2
boot: 0.05
seed: 1
zones:
  - {zone: z-a, region: r-1, instance_type: sim.gpu, gpu: A100, gpu_count: 1, gpu_memory_gb: 40, vcpus: 4,
     memory_gb: 16, spot_price: 1.00, ondemand_price: 4.00, interruption_rate: 0.0}
  - {zone: z-b, region: r-1, instance_type: sim.gpu, gpu: A100, gpu_count: 1, gpu_memory_gb: 40, vcpus: 4,
     memory_gb: 16, spot_price: 1.20, ondemand_price: 4.00, interruption_rate: 0.0}
"""
SPEC = f"""
name: kill
resources: {{gpu: "A100:1", providers: [local]}}
workdir: work
run: python counter.py --total {TOTAL} --step-time 0.05 --every 5 --blob 4096
recovery: {{max_restarts: 0, zone_cooldown: 30m}}
workload: {{hours: 0.1}}
local: {{market: market.yaml}}
"""
PHASES = ("launch", "run", "notice", "relaunch", "completion", "final_upload", "anytime")


def _job(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    shutil.copy(COUNTER, tmp_path / "work" / "counter.py")
    (tmp_path / "market.yaml").write_text(MARKET)
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC)
    return spec


def _controller(job: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "spotrun.control.controller", job],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _wait(cond: Callable[[], bool], timeout: float = 40.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


class Watch:
    """Samples the job from outside while it runs: never two live instances, never two open attempts."""

    def __init__(self, state_path: Path, provider: LocalProvider, job: str) -> None:
        self.state = State(state_path)
        self.provider, self.job = provider, job
        self.max_instances = 0
        self.max_open = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.03):
            try:
                live = [i for i in self.provider.list_owned(self.job) if self.provider.poll(i).alive]
                attempts = self.state.attempts(self.job)
            except Exception:  # noqa: BLE001, S112 - a sandbox vanishing under the sampler
                continue
            self.max_instances = max(self.max_instances, len(live))
            self.max_open = max(self.max_open, sum(1 for a in attempts if a.ended_at is None))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _store(state: State, job: str) -> LocalStore:
    store = open_store(state.job(job).store_url)
    assert isinstance(store, LocalStore)
    return store


def _exit_written(state: State, job: str) -> bool:
    store = _store(state, job)
    return any(k.endswith("/exit") for k in store.list(f"jobs/{job}/attempts/"))


def _progress(state: State, job: str) -> int:
    attempt = state.open_attempt(job)
    if attempt is None:
        return -1
    try:
        beat = json.loads(_store(state, job).get_bytes(f"jobs/{job}/attempts/{attempt.n}/heartbeat"))
    except KeyError:
        return -1
    return int((beat.get("progress") or {}).get("step") or -1)


def _preempt(state: State, job: str, provider: LocalProvider, notice: float) -> None:
    attempt = state.open_attempt(job)
    assert attempt is not None and attempt.instance is not None
    provider.preempt(Instance.from_dict(attempt.instance), notice=notice)


def _kill_at(phase: str, rng: random.Random, state: State, job: str, provider: LocalProvider) -> bool:
    """Wait for the phase, then a seeded moment inside it; True when the moment came."""
    if phase == "launch":
        ok = _wait(lambda: bool(state.attempts(job)))
        time.sleep(rng.uniform(0.0, 0.3))
        return ok
    if phase == "run":
        at = rng.randint(1, TOTAL - 5)
        return _wait(lambda: _progress(state, job) >= at)
    if phase in ("notice", "relaunch"):
        at = rng.randint(1, 8)  # early: the preemption must land before the workload is done
        if not _wait(lambda: _progress(state, job) >= at):
            return False
        _preempt(state, job, provider, notice=2.0)
        if phase == "notice":
            time.sleep(rng.uniform(0.0, 1.0))  # inside the notice window
            return True
        return _wait(lambda: len(state.attempts(job)) >= 2) and not time.sleep(rng.uniform(0.0, 0.3))
    if phase == "completion":
        return _wait(lambda: _exit_written(state, job))
    if phase == "final_upload":
        return _wait(lambda: bool(_store(state, job).list(f"jobs/{job}/outputs/")) or _exit_written(state, job))
    time.sleep(rng.uniform(0.1, 2.5))
    return True


def _fingerprint(state: State, job: str) -> dict[str, str]:
    """Bytes that must be the same as an uninterrupted run's: outputs and the newest checkpoint
    (its manifest's timestamp aside)."""
    store = _store(state, job)
    out = {}
    for key in store.list(f"jobs/{job}/outputs/"):
        out[key.split("/outputs/", 1)[1]] = hashlib.sha256(store.get_bytes(key)).hexdigest()
    steps = sorted({k.split("/checkpoints/")[1].split("/")[0] for k in store.list(f"jobs/{job}/checkpoints/")})
    newest = steps[-1]
    for key in store.list(f"jobs/{job}/checkpoints/{newest}/"):
        if not key.endswith("MANIFEST.json"):
            out[f"ckpt/{key.split(newest + '/', 1)[1]}"] = hashlib.sha256(store.get_bytes(key)).hexdigest()
    out["ckpt/step"] = newest
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("reference")
    os.environ["SPOTRUN_HOME"] = str(tmp / "home")
    try:
        spec = _job(tmp)
        state = State.open_default()
        controller = Controller(state)
        job = controller.submit(load_spec(spec))
        assert controller.run(job).status == JobStatus.SUCCEEDED
        return _fingerprint(state, job)
    finally:
        del os.environ["SPOTRUN_HOME"]


@pytest.mark.parametrize("seed", range(21))
def test_controller_sigkilled_anywhere_resumes_to_the_same_result(
    tmp_path: Path, seed: int, reference: dict[str, str]
) -> None:
    rng = random.Random(1000 + seed)
    phase = PHASES[seed % len(PHASES)]
    spec = _job(tmp_path)
    state = State.open_default()
    job = Controller(state).submit(load_spec(spec))
    provider = LocalProvider(spec.parent / "market.yaml")
    watch = Watch(state.path, provider, job)
    first = _controller(job)
    try:
        reached = _kill_at(phase, rng, state, job, provider)
        os.killpg(first.pid, signal.SIGKILL)  # mid-whatever: no cleanup, no last words
        first.wait(10)
        second = _controller(job)
        _, err = second.communicate(timeout=90)
        assert second.returncode == 0, err.decode()[-2000:]
    finally:
        watch.stop()
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    job_row = state.job(job)
    assert job_row.status == JobStatus.SUCCEEDED, (phase, job_row.reason)
    assert reached or phase in ("completion", "final_upload"), f"{phase}: the kill point never came"
    assert _fingerprint(state, job) == reference, phase  # bitwise the uninterrupted run's result
    assert watch.max_instances <= 1 and watch.max_open <= 1, (phase, watch.max_instances, watch.max_open)
    attempts = state.attempts(job)
    completed = [a.n for a in attempts if a.end_reason == "completed"]
    assert completed == [attempts[-1].n], [(a.n, a.end_reason) for a in attempts]  # never re-run after
    log = "".join(
        _store(state, job).get_bytes(k).decode()
        for k in _store(state, job).list(f"jobs/{job}/attempts/")
        if "/log/" in k
    )
    assert log.count(f"completed {TOTAL}\n") == 1, log[-3000:]  # the workload never ran again once done
    assert provider.list_owned(job) == []


def test_a_deadline_stop_asks_for_a_last_checkpoint_first(tmp_path: Path) -> None:
    """No periodic checkpoint at all (--every 100000): whatever the store holds at the end was saved
    because the controller drained the instance before stopping the job at its deadline."""
    from spotrun.control.controller import ControllerOptions

    spec = _job(tmp_path)
    assert f"--total {TOTAL} --step-time 0.05 --every 5" in SPEC
    spec.write_text(
        SPEC.replace(
            f"--total {TOTAL} --step-time 0.05 --every 5", "--total 100000 --step-time 0.02 --every 100000"
        ).replace("hours: 0.1", "hours: 0.01")
        + "deadline: 3m\n"
    )
    state = State.open_default()
    controller = Controller(state, options=ControllerOptions(poll_interval=0.1, drain_grace=1.5))
    job = controller.submit(load_spec(spec))
    result = controller.run(job)
    assert result.status == JobStatus.DEADLINE_EXCEEDED
    assert [a.end_reason for a in state.attempts(job)] == ["stopped"]
    steps = {k.split("/checkpoints/")[1].split("/")[0] for k in _store(state, job).list(f"jobs/{job}/checkpoints/")}
    assert steps and max(int(s) for s in steps) > 0  # the old code stopped it with nothing saved
    assert any(e.kind == "limit" for e in state.events(job))


def test_a_corrupt_bundle_fails_the_job_with_a_reason_naming_the_bundle(tmp_path: Path) -> None:
    """Real Agents on the local provider: the code bundle in the store is swapped after submit. Each
    attempt ends as an infrastructure failure (never "workload exited with code 1"), retried with
    backoff, and the job's reason, shown by `status`, says it was the bundle."""
    from spotrun.control.controller import ControllerOptions

    spec = _job(tmp_path)
    state = State.open_default()
    controller = Controller(state, options=ControllerOptions(poll_interval=0.1, launch_retry_backoff=0.05))
    job = controller.submit(load_spec(spec))
    store = _store(state, job)
    (key,) = store.list(f"jobs/{job}/bundle/")
    store.put_bytes(key, b"\x1f\x8b not a bundle")
    result = controller.run(job)
    assert result.status == JobStatus.FAILED
    assert "code bundle" in result.reason and "sha256" in result.reason, result.reason
    assert "workload exited" not in result.reason
    assert {a.end_reason for a in state.attempts(job)} == {"agent_error"}
    assert state.job(job).reason == result.reason  # what `status` shows
