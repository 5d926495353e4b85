"""Multi-node gangs on the local provider: real controller, N hypervisors and Agents, torchrun with
c10d rendezvous and a gloo DDP job (examples/train_ddp.py) whose sharded checkpoints go through
the store. One node is preempted at a seeded random step (or killed without notice); the gang is
relaunched whole in the other zone and must end with the weights, bit for bit, of an uninterrupted
run of the same world size."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spotrun.clouds.base import Instance
from spotrun.clouds.local.provider import LocalProvider
from spotrun.clouds.store import NotFound, open_store
from spotrun.control.controller import Controller, ControllerOptions, JobResult
from spotrun.control.state import JobStatus, State
from spotrun.spec import load_spec

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "examples" / "train_ddp.py"
SEED = int(os.environ.get("SPOTRUN_TEST_SEED", "18"))
STEPS, EVERY = 30, 5
ARGS = f"--steps {STEPS} --every-steps {EVERY}"

MARKET = """
name: gang
time_scale: 60
notice: 5
boot: 0.1
seed: 1
zones:
  - {zone: z-a, region: r-1, instance_type: sim.cpu, vcpus: 4, memory_gb: 8, spot_price: 0.10,
     ondemand_price: 0.40, interruption_rate: 0.0}
  - {zone: z-b, region: r-1, instance_type: sim.cpu, vcpus: 4, memory_gb: 8, spot_price: 0.12,
     ondemand_price: 0.40, interruption_rate: 0.0}
"""

SPEC = """
name: gang
resources: {{providers: [local], nodes: {nodes}, cpus: 1}}
workdir: work
run: torchrun train_ddp.py {args} --step-sleep 0.15
recovery: {{max_restarts: 0, zone_cooldown: 30m}}
workload: {{hours: 0.1}}
local: {{market: market.yaml}}
"""


def make_job(tmp_path: Path, nodes: int) -> Path:
    (tmp_path / "work").mkdir()
    shutil.copy(TRAIN, tmp_path / "work" / "train_ddp.py")
    (tmp_path / "market.yaml").write_text(MARKET)
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC.format(nodes=nodes, args=ARGS))
    return spec


_REFERENCE: dict[int, str] = {}


def reference_hash(world: int, tmp_path: Path) -> str:
    """The same training, never interrupted, in one torchrun with the same world size (once per size)."""
    if world not in _REFERENCE:
        _REFERENCE[world] = _reference(world, tmp_path)
    return _REFERENCE[world]


def _reference(world: int, tmp_path: Path) -> str:
    """One uninterrupted torchrun. Its process group is killed on a timeout (a worker whose peer
    died waits in gloo forever, and would outlive the test) and the run tried once more: on a
    loaded machine the standalone rendezvous has been seen to hang."""
    import signal

    env = {**os.environ, "SPOTRUN_CHECKPOINT_DIR": str(tmp_path / "ref-ck"), "GLOO_SOCKET_IFNAME": "lo"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(TRAIN), *ARGS.split()]  # fmt: skip
    for attempt in range(2):
        shutil.rmtree(tmp_path / "ref-ck", ignore_errors=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun passes SIGTERM on to its workers and waits for them
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            if attempt == 0:
                continue
            raise
        assert proc.returncode == 0, err[-3000:]
        return re.search(r"FINAL_WEIGHTS_SHA256=([0-9a-f]{64})", out).group(1)  # type: ignore[union-attr]
    raise AssertionError("unreachable")


def heartbeat_step(state: State, job_id: str) -> int:
    attempt = state.open_attempt(job_id)
    if attempt is None or attempt.instance is None:
        return -1
    store = open_store(state.job(job_id).store_url)
    try:
        hb = json.loads(store.get_bytes(f"jobs/{job_id}/attempts/{attempt.n}/heartbeat"))
    except (NotFound, KeyError, ValueError):
        return -1
    return int((hb.get("progress") or {}).get("step") or -1)


class Running:
    """A controller driving a job in a thread of this test."""

    def __init__(self, controller: Controller, job_id: str) -> None:
        self.box: dict[str, object] = {}
        self.thread = threading.Thread(target=lambda: self.box.setdefault("r", controller.run(job_id)), daemon=True)
        self.thread.start()

    def join(self) -> JobResult:
        self.thread.join(240)
        assert not self.thread.is_alive(), "the job did not finish"
        return self.box["r"]  # type: ignore[return-value]

    def wait_for(self, cond: Callable[[], bool], what: str, timeout: float = 150.0) -> None:
        """Until `cond`; fails at once, saying how, if the job ends first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            if not self.thread.is_alive():
                raise AssertionError(f"the job ended before {what}: {self.box.get('r')}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")


def node_instances(state: State, job_id: str) -> list[Instance]:
    attempt = state.open_attempt(job_id)
    assert attempt is not None and attempt.instance is not None
    return [Instance.from_dict(d) for d in attempt.instance["details"]["gang"]]


def committed_steps(store, job_id: str) -> list[int]:  # type: ignore[no-untyped-def]
    keys = store.list(f"jobs/{job_id}/checkpoints/")
    return sorted(int(k.split("/")[3]) for k in keys if k.endswith("/MANIFEST.json"))


def all_logs(store, job_id: str, n: int) -> str:  # type: ignore[no-untyped-def]
    """Attempt n's log chunks (a chunk listed but gone by the time it is read is skipped)."""
    out = []
    for k in sorted(store.list(f"jobs/{job_id}/")):
        if f"/attempts/{n}/log/" in k:
            try:
                out.append(store.get_bytes(k).decode())
            except NotFound:
                continue
    return "".join(out)


@pytest.mark.parametrize("nodes", [2, 3])
def test_gang_preempted_at_a_seeded_step_resumes_bitwise_in_another_zone(tmp_path: Path, nodes: int) -> None:
    rng = random.Random(SEED * 10 + nodes)
    at_step, victim = rng.randint(7, 18), rng.randrange(nodes)
    spec = make_job(tmp_path, nodes)
    state = State.open_default()
    controller = Controller(state, options=ControllerOptions(poll_interval=0.1))
    job = controller.submit(load_spec(spec))
    store = open_store(state.job(job).store_url)
    running = Running(controller, job)
    running.wait_for(lambda: heartbeat_step(state, job) >= at_step, f"step {at_step}")
    provider = LocalProvider(tmp_path / "market.yaml")
    provider.preempt(node_instances(state, job)[victim], notice=8)
    result = running.join()

    assert (result.status, result.exit_code, result.preemptions) == (JobStatus.SUCCEEDED, 0, 1)
    attempts = state.attempts(job)
    assert [(a.zone, a.end_reason) for a in attempts] == [("z-a", "preempted"), ("z-b", "completed")]
    assert len(attempts[1].instance["details"]["gang"]) == nodes  # type: ignore[index]
    log2 = all_logs(store, job, 2)
    resumed = int(re.search(r"starting at step (\d+)", log2).group(1))  # type: ignore[union-attr]
    # the notice's checkpoint, taken by every rank at the same step
    assert resumed >= at_step, all_logs(store, job, 1) + "\n=====\n" + log2
    final = store.get_bytes(f"jobs/{job}/outputs/weights.sha256").decode().strip()
    assert final == reference_hash(nodes, tmp_path)
    assert provider.list_owned(job) == []


def test_gang_node_killed_without_notice_resumes_from_the_last_complete_checkpoint(tmp_path: Path) -> None:
    nodes = 2
    spec = make_job(tmp_path, nodes)
    state = State.open_default()
    controller = Controller(state, options=ControllerOptions(poll_interval=0.1))
    job = controller.submit(load_spec(spec))
    store = open_store(state.job(job).store_url)
    running = Running(controller, job)
    # The uploader sends the newest committed checkpoint and skips the ones it superseded (a slow
    # machine may never upload step 10): wait for any at or past it.
    running.wait_for(
        lambda: max(committed_steps(store, job), default=-1) >= EVERY * 2, f"a checkpoint >= {EVERY * 2} committed"
    )
    before = committed_steps(store, job)
    provider = LocalProvider(tmp_path / "market.yaml")
    provider.preempt(node_instances(state, job)[1], notice=0)  # SIGKILL, no notice
    result = running.join()

    assert (result.status, result.exit_code, result.preemptions) == (JobStatus.SUCCEEDED, 0, 1)
    log2 = all_logs(store, job, 2)
    restored = int(re.search(r"restored checkpoint (\d+)", log2).group(1))  # type: ignore[union-attr]
    resumed = int(re.search(r"starting at step (\d+)", log2).group(1))  # type: ignore[union-attr]
    assert restored == resumed and restored >= max(before) and restored % EVERY == 0
    final = store.get_bytes(f"jobs/{job}/outputs/weights.sha256").decode().strip()
    assert final == reference_hash(nodes, tmp_path)
    assert provider.list_owned(job) == []
