"""What the fake-cloud end-to-end tests share: a tiny deterministic workload, the job file, a
controller running in a thread, and "wait until the store shows X" helpers.

The tiny workload (`TINY_WORKLOAD`) is a training loop in miniature with everything the real one
has that matters to spotrun: a state that evolves step by step (8 floats), checkpoints in the
shared on-disk format (`<step>/state.json` + MANIFEST.json, committed by rename), a progress file,
and on SIGTERM a save at the next step boundary and exit 143. Its final `weights.sha256` depends
only on the number of steps, so an interrupted and resumed run must produce the reference digest
bit for bit. It starts in ~50 ms (no torch), which keeps the fake-cloud tests to seconds; the
torch example (examples/train.py) is used where the bitwise claim is about real training.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotrun.catalog.model import Offer
from spotrun.clock import SYSTEM_CLOCK
from spotrun.clouds.base import Boot
from spotrun.clouds.store import NotFound, Store, job_prefix, open_store
from spotrun.control.controller import Controller, ControllerOptions, JobResult
from spotrun.control.state import State
from spotrun.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]

TINY_WORKLOAD = r'''
"""A deterministic miniature of training: python tiny_train.py STEPS EVERY PAUSE.

PAUSE (seconds per step) applies to the first attempt only: slow while a test gets ready to
preempt it, at full speed once resumed. The weights never depend on it."""
import hashlib, json, math, os, signal, struct, sys, time
from pathlib import Path

from spotrun.checkpoint.format import commit, latest_checkpoint, new_temp_dir, prune, sha256_file, write_manifest

steps, every, pause = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
pause = pause if os.environ.get("SPOTRUN_ATTEMPT", "1") == "1" else 0.0
root = Path(os.environ.get("SPOTRUN_CHECKPOINT_DIR", "checkpoints"))
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

latest = latest_checkpoint(root)
state = json.loads((latest / "state.json").read_text()) if latest else {"step": 0, "w": [0.0] * 8}
step, w = state["step"], state["w"]
print(f"RESUMED_FROM={step}", flush=True)


def save(step):
    tmp = new_temp_dir(root, step)
    (tmp / "state.json").write_text(json.dumps({"step": step, "w": w}))
    write_manifest(tmp, step, {"state.json": ((tmp / "state.json").stat().st_size, sha256_file(tmp / "state.json"))})
    commit(tmp, root, step)
    prune(root, 3)


def progress(step):
    path = os.environ.get("SPOTRUN_PROGRESS_FILE")
    if path:
        Path(path + ".tmp").write_text(json.dumps({"step": step, "total": steps, "at": time.time()}))
        os.replace(path + ".tmp", path)


while step < steps:
    step += 1
    w = [x * 0.999 + math.sin(step * (i + 1) * 0.01) for i, x in enumerate(w)]
    progress(step)
    if stop:
        save(step)
        print(f"PREEMPTED_AT={step}", flush=True)
        sys.exit(143)
    if step % every == 0 or step == steps:
        save(step)
    time.sleep(pause)

digest = hashlib.sha256(struct.pack("8d", *w)).hexdigest()
out = os.environ.get("SPOTRUN_OUTPUT_DIR")
if out:
    Path(out, "weights.sha256").write_text(digest + "\n")
print(f"FINAL_WEIGHTS_SHA256={digest}", flush=True)
'''

SPEC = """
name: {name}
resources:
  gpu: "{gpu}:1"
  providers: [{providers}]
workdir: {workdir}
run: {run}
checkpoint: {{keep: 3}}
recovery: {recovery}
"""


def write_tiny_workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tiny_train.py").write_text(TINY_WORKLOAD)
    return path


class Reference:
    """Run the workload once, uninterrupted, outside spotrun, in the background (it shares no state
    with the job under test): `digest()` is what every resumed run must produce, bit for bit."""

    def __init__(self, workdir: Path, args: list[str], script: str = "tiny_train.py") -> None:
        run_dir = workdir.parent / f"reference-{script}"  # not the workdir: the job's bundle is packed from it
        run_dir.mkdir()
        env = {"PYTHONPATH": str(ROOT), "SPOTRUN_CHECKPOINT_DIR": str(run_dir / "checkpoints"), "PATH": "/usr/bin:/bin"}
        self._proc = subprocess.Popen(
            [sys.executable, str(workdir / script), *args],
            cwd=run_dir,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def digest(self, timeout: float = 120) -> str:
        out, _ = self._proc.communicate(timeout=timeout)
        assert self._proc.returncode == 0, out
        for line in out.splitlines():
            if line.startswith("FINAL_WEIGHTS_SHA256="):
                return line.split("=", 1)[1].strip()
        raise AssertionError(f"no FINAL_WEIGHTS_SHA256 line in:\n{out}")


def write_spec(
    path: Path,
    *,
    name: str,
    gpu: str,
    providers: list[str],
    workdir: Path,
    run: str,
    recovery: str = "{max_restarts: 0, zone_cooldown: 1h}",
) -> Any:
    text = SPEC.format(
        name=name, gpu=gpu, providers=", ".join(providers), workdir=workdir, run=json.dumps(run), recovery=recovery
    )
    path.write_text(text)
    return load_spec(path)


@dataclass
class ControllerRun:
    """`controller.run(job)` in a thread (it blocks until the job ends), as `spotrun launch` does."""

    controller: Controller
    job_id: str
    result: JobResult | None = None
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"controller-{self.job_id}", daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.controller.run(self.job_id)
        except BaseException as e:  # surfaced by join()
            self.error = e

    def start(self) -> ControllerRun:
        self.thread.start()
        return self

    def until(self, predicate: Callable[[], Any], *, timeout: float, what: str, report: Callable[[], str]) -> Any:
        """Poll `predicate` until truthy; fail at once (with the Agents' logs) if the job ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if not self.thread.is_alive():
                outcome = self.result.to_dict() if self.result else repr(self.error)
                raise AssertionError(f"the job ended ({outcome}) before {what}\n{report()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{report()}")

    def join(self, timeout: float, report: Callable[[], str] = lambda: "") -> JobResult:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.controller.state.request_cancel(self.job_id, time.time())  # stop it, and its instances
            self.thread.join(15)
            raise AssertionError(f"the job did not finish within {timeout}s\n{report()}")
        if self.error is not None:
            raise AssertionError(f"the controller raised {self.error!r}\n{report()}") from self.error
        assert self.result is not None
        return self.result


def make_controller(tmp_path: Path, *, providers: dict[str, Any], offers: list[Offer], store_url: str) -> Controller:
    """A real controller on real time: the Agents run in real time too. Polls fast (0.1 s)."""
    options = ControllerOptions(
        poll_interval=0.1,
        capacity_wait=20.0,
        launch_retry_backoff=0.2,
        heartbeat_timeout=60.0,
        upload_budget=3.0,
        heartbeat_interval=0.3,
        log_flush_interval=0.3,
    )
    return Controller(
        State(tmp_path / "state.db"),
        providers=providers,
        offers=offers,
        store_url=store_url,
        clock=SYSTEM_CLOCK,
        options=options,
    )


# ---------------------------------------------------------------------- reading the store


def store_steps(store: Store, job_id: str) -> list[int]:
    """Steps of the checkpoints in the store whose manifest is there (complete uploads)."""
    prefix = f"{job_prefix(job_id)}/checkpoints/"
    steps = set()
    for key in store.list(prefix):
        head, _, rel = key[len(prefix) :].partition("/")
        if rel == "MANIFEST.json" and head.isdigit():
            steps.add(int(head))
    return sorted(steps)


def exit_record(store: Store, job_id: str, attempt: int) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_bytes(f"{job_prefix(job_id)}/attempts/{attempt}/exit"))
    except NotFound:
        return None


def output_digest(store: Store, job_id: str) -> str:
    return store.get_bytes(f"{job_prefix(job_id)}/outputs/weights.sha256").decode().strip()


# ---------------------------------------------------------------------- boot failures

BOOT_FAILURES = {
    # what breaks -> what the boot log's last lines must say
    "index-unreachable": "pip install of the Agent's dependencies",
    "corrupt-package": "corrupt Agent package",
}


def corrupt_agent_package(boot: Boot) -> None:
    """An instance emulator's `before_boot` hook: damage the Agent package the controller has just
    uploaded (and verified), between its upload and the VM's fetch, as a swapped store object
    would be. The VM must refuse it by the sha256 in its boot record."""
    store = open_store(boot.store_url)
    key = boot.spotrun_package[len(boot.store_url.rstrip("/")) :].lstrip("/")
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(key, bytes(data))


def assert_failed_booting(
    result: JobResult, controller: Controller, job_id: str, failure: str, limit: int, expect: str = ""
) -> None:
    """The job ended FAILED (exit 1) after `limit` boot failures, and says why with the boot log."""
    expect = expect or BOOT_FAILURES[failure]
    assert expect
    assert (result.status.value, result.exit_code) == ("FAILED", 1), result
    attempts = controller.state.attempts(job_id)
    assert [a.end_reason for a in attempts] == ["boot_failed"] * limit, [(a.end_reason, a.detail) for a in attempts]
    assert f"{limit} boot failures (max_boot_failures {limit})" in result.reason, result.reason
    assert expect in result.reason, result.reason  # the boot log's own words
    assert "BOOT FAILED" in result.reason, result.reason
    assert expect in controller.state.job(job_id).reason
    status = spotrun_status(controller, job_id)  # what the user sees
    assert "FAILED" in status and expect in status and "boot_failed" in status, status


def spotrun_status(controller: Controller, job_id: str) -> str:
    """`spotrun status <job>` as a user runs it, on the controller's own state database."""
    home = Path(controller.state.path).parent
    env = {"PATH": "/usr/bin:/bin", "SPOTRUN_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "spotrun", "status", job_id], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_booted_on_the_image(emulator: Any, instance_id: str) -> None:
    """Where the emulated VM image runs here, the instance really was a VM: its unmodified
    bootstrap ran on the image's Python 3.9, verified the Agent package and installed it."""
    from tests.fakes import vm_image

    if vm_image.unavailable():
        return
    assert emulator.mode == "vm", emulator.why_not_vm
    console = emulator.instance(instance_id).agent_log()
    assert "spotrun bootstrap: job" in console and ", python 3.9." in console, console[-3000:]
    assert "sha256 verified" in console and "starting the Agent: /usr/bin/python3 -m spotrun.agent" in console
    assert "BOOT FAILED" not in console, console[-3000:]  # a preempted or finished attempt booted fine
