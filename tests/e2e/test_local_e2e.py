"""Whole jobs on the local provider: real controller, real hypervisor and Agent processes, a real
LocalStore and SQLite state; the workload is tests/fixtures/counter.py (no torch, so each run
takes seconds). Preemptions come from the market's own test hook, exactly as the market would
deliver them (notice file, then the kill)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from spotrun.clouds.base import Instance
from spotrun.clouds.local.host import marked_processes
from spotrun.clouds.local.provider import LocalProvider
from spotrun.clouds.store import open_store
from spotrun.control.controller import Controller, ControllerOptions, JobResult
from spotrun.control.state import JobStatus, State
from spotrun.spec import load_spec

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
COUNTER = ROOT / "tests" / "fixtures" / "counter.py"

MARKET = """
name: e2e
time_scale: 60
notice: 3
boot: 0.1
seed: 1
zones:
  - {{zone: z-a, region: r-1, instance_type: sim.gpu, gpu: A100, gpu_count: 1, gpu_memory_gb: 40, vcpus: 4,
     memory_gb: 16, spot_price: 1.00, ondemand_price: 4.00, interruption_rate: 0.0{outage_a}}}
  - {{zone: z-b, region: r-1, instance_type: sim.gpu, gpu: A100, gpu_count: 1, gpu_memory_gb: 40, vcpus: 4,
     memory_gb: 16, spot_price: 1.20, ondemand_price: 4.00, interruption_rate: 0.0}}
"""

SPEC = """
name: e2e
resources: {{gpu: "A100:1", providers: [local]}}
workdir: work
run: python counter.py {args}
recovery: {{max_restarts: {restarts}, zone_cooldown: 30m}}
workload: {{hours: 0.1}}
local: {{market: market.yaml}}
"""


def make_job(tmp_path: Path, args: str, *, restarts: int = 2, outage_a: bool = False) -> Path:
    (tmp_path / "work").mkdir()
    shutil.copy(COUNTER, tmp_path / "work" / "counter.py")
    (tmp_path / "market.yaml").write_text(MARKET.format(outage_a=", outages: [[0, 100000]]" if outage_a else ""))
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC.format(args=args, restarts=restarts))
    return spec


def start(spec_path: Path) -> tuple[Controller, State, str]:
    state = State.open_default()
    controller = Controller(state, options=ControllerOptions(poll_interval=0.1))
    job_id = controller.submit(load_spec(spec_path))
    return controller, state, job_id


def run_in_thread(controller: Controller, job_id: str) -> Callable[[], JobResult]:
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", controller.run(job_id)), daemon=True)
    thread.start()

    def join() -> JobResult:
        thread.join(120)
        assert not thread.is_alive(), "the job did not finish"
        return box["r"]  # type: ignore[return-value]

    return join


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def progress(state: State, job_id: str) -> int:
    attempt = state.open_attempt(job_id)
    if attempt is None:
        return -1
    store = open_store(state.job(job_id).store_url)
    try:
        hb = json.loads(store.get_bytes(f"jobs/{job_id}/attempts/{attempt.n}/heartbeat"))
    except KeyError:
        return -1
    return int((hb.get("progress") or {}).get("step") or -1)


def current_instance(state: State, job_id: str) -> Instance:
    attempt = state.open_attempt(job_id)
    assert attempt is not None and attempt.instance is not None
    return Instance.from_dict(attempt.instance)


def provider_for(spec_path: Path) -> LocalProvider:
    return LocalProvider(spec_path.parent / "market.yaml")


def job_log(state: State, job_id: str) -> str:
    store = open_store(state.job(job_id).store_url)
    return "".join(store.get_bytes(k).decode() for k in store.list(f"jobs/{job_id}/attempts/") if "/log/" in k)


def attempt_log(state: State, job_id: str, n: int) -> str:
    store = open_store(state.job(job_id).store_url)
    return "".join(store.get_bytes(k).decode() for k in store.list(f"jobs/{job_id}/attempts/{n}/log/"))


def steps_run(log: str) -> Counter[int]:
    return Counter(int(m) for m in re.findall(r"^step (\d+)$", log, re.M))


def assert_nothing_left(state: State, job_id: str, provider: LocalProvider) -> None:
    assert provider.list_owned(job_id) == []
    for a in state.attempts(job_id):
        if a.instance_id:
            assert marked_processes(a.instance_id) == [], f"processes of {a.instance_id} survive"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spotrun", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


# ---------------------------------------------------------------------------------------------------


def test_preempted_with_notice_resumes_elsewhere_losing_no_step(tmp_path: Path) -> None:
    spec = make_job(tmp_path, "--total 60 --step-time 0.05 --every 10")
    controller, state, job = start(spec)
    join = run_in_thread(controller, job)
    wait_for(lambda: progress(state, job) >= 15, what="step 15")
    provider = provider_for(spec)
    provider.preempt(current_instance(state, job), notice=3)
    result = join()

    assert (result.status, result.exit_code, result.preemptions) == (JobStatus.SUCCEEDED, 0, 1)
    attempts = state.attempts(job)
    assert [(a.zone, a.end_reason) for a in attempts] == [("z-a", "preempted"), ("z-b", "completed")]
    steps = steps_run(job_log(state, job))
    assert sorted(steps) == list(range(1, 61)) and set(steps.values()) == {1}  # every step once: none lost
    assert "saved step" in attempt_log(state, job, 1)
    store = open_store(state.job(job).store_url)
    assert store.get_bytes(f"jobs/{job}/outputs/result.txt") == b"done at 60\n"
    assert result.spent > 0 and result.ondemand_equivalent and result.spent < result.ondemand_equivalent
    assert_nothing_left(state, job, provider)


def test_killed_without_notice_resumes_from_the_last_periodic_checkpoint(tmp_path: Path) -> None:
    spec = make_job(tmp_path, "--total 50 --step-time 0.1 --every 10")
    controller, state, job = start(spec)
    store = open_store(state.job(job).store_url)
    join = run_in_thread(controller, job)
    wait_for(lambda: store.exists(f"jobs/{job}/checkpoints/{20:012d}/MANIFEST.json"), what="checkpoint 20 uploaded")
    wait_for(lambda: progress(state, job) >= 24, what="step 24")
    uploaded = max(int(k.split("/")[3]) for k in store.list(f"jobs/{job}/checkpoints/") if k.endswith("MANIFEST.json"))
    killed_at = progress(state, job)
    provider = provider_for(spec)
    provider.preempt(current_instance(state, job), notice=0)
    result = join()

    assert result.exit_code == 0 and result.preemptions == 1
    resumed = int(re.search(r"resumes at (\d+)", attempt_log(state, job, 2)).group(1))  # type: ignore[union-attr]
    assert resumed % 10 == 0 and uploaded <= resumed <= killed_at
    steps = steps_run(job_log(state, job))
    assert sorted(steps) == list(range(1, 51))
    assert all(steps[s] == 2 for s in range(resumed + 1, killed_at + 1))  # the lost work, redone once
    assert_nothing_left(state, job, provider)


def test_capacity_outage_in_the_cheapest_zone_fails_over(tmp_path: Path) -> None:
    spec = make_job(tmp_path, "--total 5 --step-time 0.01", outage_a=True)
    controller, state, job = start(spec)
    result = controller.run(job)
    assert result.exit_code == 0
    attempts = state.attempts(job)
    assert [(a.zone, a.end_reason) for a in attempts] == [("z-a", "launch_failed"), ("z-b", "completed")]
    assert "NoCapacity" in attempts[0].detail
    assert_nothing_left(state, job, provider_for(spec))


def test_user_code_failure_is_retried_then_fails_with_exit_1(tmp_path: Path) -> None:
    spec = make_job(tmp_path, "--total 10 --step-time 0.01 --fail-at 3", restarts=2)
    proc = cli("launch", str(spec), "--json")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "FAILED" and result["job_exit_code"] == 3 and result["attempts"] == 3
    state = State.open_default()
    assert [a.end_reason for a in state.attempts(result["job_id"])] == ["failed"] * 3
    status = json.loads(cli("status", result["job_id"], "--json").stdout)
    assert status["job_exit_code"] == 3 and "max_restarts 2" in status["reason"]
    assert_nothing_left(state, result["job_id"], provider_for(spec))


def test_cancel_mid_run_leaves_no_process(tmp_path: Path) -> None:
    spec = make_job(tmp_path, "--total 100000 --step-time 0.05")
    proc = cli("launch", str(spec), "--detach", "--json")
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)["job_id"]
    state = State.open_default()
    wait_for(lambda: progress(state, job) >= 3, what="the job to run")
    instance_ids = [a.instance_id for a in state.attempts(job) if a.instance_id]
    cancel = cli("cancel", job)
    assert cancel.returncode == 0, cancel.stderr
    assert state.job(job).status == JobStatus.CANCELLED and state.job(job).exit_code == 130
    wait_for(lambda: state.job(job).controller_pid is None, timeout=10, what="the controller to exit")
    for iid in instance_ids:
        assert marked_processes(iid) == []
    assert_nothing_left(state, job, provider_for(spec))
    assert "CANCELLED" in cli("status", job).stdout


def test_controller_killed_and_restarted_never_runs_two_instances(tmp_path: Path) -> None:
    spec = make_job(tmp_path, "--total 80 --step-time 0.05 --every 10")
    ctl = subprocess.Popen(
        [sys.executable, "-m", "spotrun", "launch", str(spec), "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    state = State.open_default()
    wait_for(lambda: bool(state.jobs()), what="the job to be submitted")
    job = state.jobs()[0].id
    wait_for(lambda: progress(state, job) >= 10, what="step 10")
    os.killpg(ctl.pid, signal.SIGKILL)  # the controller dies; its instance keeps running
    ctl.wait()
    provider = provider_for(spec)
    assert len(provider.list_owned(job)) == 1
    assert "no controller" in cli("status").stdout

    proc = cli("launch", "--resume", job, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "SUCCEEDED"
    attempts = state.attempts(job)
    assert len(attempts) == 1 and attempts[0].end_reason == "completed"  # the same instance, adopted
    assert sorted(steps_run(job_log(state, job))) == list(range(1, 81))
    assert_nothing_left(state, job, provider)
