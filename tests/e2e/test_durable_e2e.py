"""The job outlives the machine that launched it (issue 16), end to end on the local provider.

Each SPOTRUN_HOME stands for a machine: A launches with `--detach` and its process exits; B (and
C) know nothing but the store's URL. The local cloud is shared between them (SPOTRUN_LOCAL_ROOT),
as machines share a real cloud. Real CLI processes, real durable controllers, real hypervisor and
Agent processes; the workload is tests/fixtures/counter.py."""

from __future__ import annotations

import json
import os
import random
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
from spotrun.clouds.store import open_store
from spotrun.control.durable.lease import read_lease
from spotrun.control.durable.record import publish
from spotrun.control.durable.remote import NoRecord, StoreView
from spotrun.control.durable.state import DurableState
from spotrun.control.state import JobStatus
from tests.test_faults_kill import TOTAL, _fingerprint, _job, reference  # noqa: F401  (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]
TTL = "2"


class World:
    """Machines (SPOTRUN_HOMEs) around one store and one local cloud."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.spec = _job(tmp)
        self.store_url = (tmp / "store").as_uri()
        self.cloud = tmp / "cloud"
        self.provider = LocalProvider(tmp / "market.yaml", root=self.cloud)
        self.extra_env: dict[str, dict[str, str]] = {}

    def env(self, machine: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(SPOTRUN_HOME=str(self.tmp / machine), SPOTRUN_LOCAL_ROOT=str(self.cloud), SPOTRUN_LEASE_TTL=TTL)
        env.update(self.extra_env.get(machine, {}))
        return env

    def cli(self, machine: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "spotrun", *args],
            cwd=ROOT,
            env=self.env(machine),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def launch_detached(self) -> str:
        out = self.cli("a", "launch", str(self.spec), "--detach", "--store", self.store_url, "--yes", "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        return str(json.loads(out.stdout)["job_id"])

    def view(self, job: str) -> StoreView:
        assert _wait(lambda: _has_record(self.store_url, job), 20), "no record in the store"
        return StoreView(self.store_url, job)

    def progress(self, view: StoreView) -> int:
        view.refresh()
        open_ = [a for a in view.attempts() if a.ended_at is None and a.started_at is not None]
        if not open_:
            return -1
        try:
            beat = json.loads(view.store.get_bytes(f"jobs/{view.job_id}/attempts/{open_[-1].n}/heartbeat"))
        except KeyError:
            return -1
        return int((beat.get("progress") or {}).get("step") or -1)

    def preempt(self, view: StoreView) -> None:
        view.refresh()
        attempt = [a for a in view.attempts() if a.ended_at is None][-1]
        assert attempt.instance is not None
        self.provider.preempt(Instance.from_dict(attempt.instance), notice=2.0)


def _has_record(url: str, job: str) -> bool:
    try:
        StoreView(url, job)
    except NoRecord:
        return False
    return True


def _wait(cond: Callable[[], bool], timeout: float = 40.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


class Sampler:
    """From outside: never two live instances of the job, never two open attempts in its record."""

    def __init__(self, world: World, job: str) -> None:
        self.world, self.job = world, job
        self.max_instances = self.max_open = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        provider = LocalProvider(self.world.tmp / "market.yaml", root=self.world.cloud)
        while not self._stop.wait(0.03):
            try:
                live = [i for i in provider.list_owned(self.job) if provider.poll(i).alive]
                attempts = StoreView(self.world.store_url, self.job).attempts()
            except Exception:  # noqa: BLE001, S112 - a sandbox or record vanishing under the sampler
                continue
            self.max_instances = max(self.max_instances, len(live))
            self.max_open = max(self.max_open, sum(1 for a in attempts if a.ended_at is None))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _kill_controller(view: StoreView) -> int:
    lease = read_lease(view.store, view.job_id)
    assert lease and lease["holder"], lease
    pid = int(lease["pid"])
    os.killpg(pid, signal.SIGKILL)  # the controller host dies: no cleanup, no lease release
    return pid


def _reap_controllers(world: World, job: str) -> None:
    lease = read_lease(open_store(world.store_url), job) or {}
    pid = int(lease.get("pid") or 0)
    if lease.get("holder") and pid:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_detached_job_through_a_preemption_seen_from_another_machine(tmp_path: Path) -> None:
    world = World(tmp_path)
    job = world.launch_detached()  # the launching process has exited
    view = world.view(job)
    sampler = Sampler(world, job)
    try:
        assert _wait(lambda: world.progress(view) >= 8), "the workload never got going"
        world.preempt(view)
        waited = world.cli("b", "wait", job, "--store", world.store_url, "--json")
    finally:
        sampler.stop()
        _reap_controllers(world, job)
    assert waited.returncode == 0, waited.stderr[-2000:]
    assert json.loads(waited.stdout)["status"] == "SUCCEEDED"
    assert "started one here" not in waited.stderr  # A's detached controller drove it all along
    status = world.cli("b", "status", job, "--store", world.store_url, "--json")
    assert status.returncode == 0, status.stderr
    row = json.loads(status.stdout)
    assert (row["status"], row["preemptions"], row["attempts"], row["exit_code"]) == ("SUCCEEDED", 1, 2, 0)
    assert row["lease"]["holder"] is None  # released at the end
    short = world.cli("b", "status", job[:-2], "--store", world.store_url, "--json")  # a unique prefix
    assert short.returncode == 0 and json.loads(short.stdout)["status"] == "SUCCEEDED", short.stderr
    logs = world.cli("b", "logs", job, "--store", world.store_url)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.count("==> attempt ") == 2 and f"completed {TOTAL}\n" in logs.stdout
    assert sampler.max_instances <= 1 and sampler.max_open <= 1
    assert not (tmp_path / "b" / f"controller-{job}.log").exists()  # B only read the store
    missing = world.cli("b", "wait", "no-such-job", "--store", world.store_url, "--timeout", "1")
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr


def test_cancel_from_another_machine(tmp_path: Path) -> None:
    world = World(tmp_path)
    # 20 s of work, not 2: the cancel (a CLI start-up, then the controller's next look at the store)
    # must land before the job ends, also on a loaded machine
    world.spec.write_text(world.spec.read_text().replace("--step-time 0.05", "--step-time 0.5"))
    job = world.launch_detached()
    view = world.view(job)
    try:
        assert _wait(lambda: world.progress(view) >= 2)
        out = world.cli("b", "cancel", job, "--store", world.store_url, "--json")
    finally:
        _reap_controllers(world, job)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["cancelled"][0]["status"] == "CANCELLED"
    waited = world.cli("b", "wait", job, "--store", world.store_url)
    assert waited.returncode == 130
    assert world.provider.list_owned(job) == []


PHASES = ("launch", "run", "notice", "relaunch", "completion")


def _kill_moment(phase: str, rng: random.Random, world: World, view: StoreView) -> bool:
    if phase == "launch":
        time.sleep(rng.uniform(0.0, 0.3))
        return True
    if phase == "run":
        at = rng.randint(1, TOTAL - 5)
        return _wait(lambda: world.progress(view) >= at)
    if phase in ("notice", "relaunch"):
        at = rng.randint(1, 8)
        if not _wait(lambda: world.progress(view) >= at):
            return False
        world.preempt(view)
        if phase == "notice":
            time.sleep(rng.uniform(0.0, 1.0))
            return True
        return _wait(lambda: (view.refresh(), len(view.attempts()))[1] >= 2) and not time.sleep(rng.uniform(0, 0.3))
    prefix = f"jobs/{view.job_id}/attempts/"
    return _wait(lambda: any(k.endswith("/exit") for k in view.store.list(prefix)))


@pytest.mark.parametrize("seed", range(5))
def test_controller_host_killed_is_replaced_from_another_machine(
    tmp_path: Path,
    seed: int,
    reference: dict[str, str],  # noqa: F811 - the uninterrupted run, from test_faults_kill
) -> None:
    """A's detached controller is SIGKILLed at a seeded moment; `wait --store` on B notices (the
    lease's holder is dead), starts a controller on B that rebuilds its database from the record
    and adopts the running instance. The result is bitwise the uninterrupted run's."""
    rng = random.Random(1600 + seed)
    phase = PHASES[seed % len(PHASES)]
    world = World(tmp_path)
    job = world.launch_detached()
    view = world.view(job)
    sampler = Sampler(world, job)
    try:
        reached = _kill_moment(phase, rng, world, view)
        _kill_controller(view)
        waited = world.cli("b", "wait", job, "--store", world.store_url, "--json")
    finally:
        sampler.stop()
        _reap_controllers(world, job)
    assert waited.returncode == 0, (phase, waited.stderr[-2000:])
    assert reached or phase == "completion", f"{phase}: the kill point never came"
    check_adopted_run(world, view, phase, sampler, reference)


def check_adopted_run(world: World, view: StoreView, phase: str, sampler: Sampler, expected: dict[str, str]) -> None:
    """After a controller (or the controller host) was killed and machine B's `wait` adopted the
    job: B drove its end from its own cache, it succeeded bitwise like the uninterrupted run, never
    two instances or open attempts, the workload completed once, nothing left running."""
    job = view.job_id
    assert (world.tmp / "b" / f"controller-{job}.log").exists()  # B started the replacement
    assert (world.tmp / "b" / "state.db").exists()
    view.refresh()
    assert view.job().status == JobStatus.SUCCEEDED
    assert _fingerprint(view, job) == expected, phase  # type: ignore[arg-type]
    assert sampler.max_instances <= 1 and sampler.max_open <= 1, (phase, sampler.max_instances, sampler.max_open)
    attempts = view.attempts()
    assert [a.n for a in attempts if a.end_reason == "completed"] == [attempts[-1].n]
    if phase in ("launch", "run", "completion"):  # no preemption: B adopted the instance, launched none
        assert [a.n for a in attempts if a.started_at is not None] == [1], [(a.n, a.end_reason) for a in attempts]
    logs = "".join(view.store.get_bytes(k).decode() for k in view.store.list(f"jobs/{job}/attempts/") if "/log/" in k)
    assert logs.count(f"completed {TOTAL}\n") == 1, logs[-3000:]  # never run again once done
    assert world.provider.list_owned(job) == []


@pytest.mark.parametrize("seed", range(2))
def test_two_controllers_on_two_machines_one_drives(tmp_path: Path, seed: int) -> None:
    """A job known only from the store; machines B and C each start a controller for it at once."""
    from spotrun.control.controller import Controller
    from spotrun.spec import load_spec

    rng = random.Random(1700 + seed)
    world = World(tmp_path)
    os.environ["SPOTRUN_HOME"] = str(tmp_path / "a")
    try:
        state = DurableState(tmp_path / "a" / "state.db")
        job = Controller(state, store_url=world.store_url).submit(load_spec(world.spec))
        publish(state, open_store(world.store_url), job)
    finally:
        del os.environ["SPOTRUN_HOME"]
    sampler = Sampler(world, job)
    procs = []
    try:
        for machine in ("b", "c"):
            time.sleep(rng.uniform(0, 0.05))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "spotrun.control.durable", job, "--store", world.store_url],
                    cwd=ROOT,
                    env=world.env(machine),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            )
        errs = [p.communicate(timeout=90)[1].decode() for p in procs]
    finally:
        sampler.stop()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], (codes, errs)
    assert any("already has a live controller" in e for e in errs), errs
    view = StoreView(world.store_url, job)
    assert view.job().status == JobStatus.SUCCEEDED
    assert sampler.max_instances <= 1 and sampler.max_open <= 1
    assert len([a for a in view.attempts() if a.started_at is not None]) == 1
