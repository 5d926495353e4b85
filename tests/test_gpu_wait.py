"""The Agent waits for the GPU driver to show the offer's GPUs before the workload starts, and ends
the attempt as a boot failure when they never show; containers get the GPUs (docker, podman CDI).
No GPU needed: a fake `nvidia-smi` on PATH plays the driver."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from spotrun.agent import jobfile
from spotrun.agent.jobfile import AgentJob
from spotrun.agent.main import EXIT_AGENT_ERROR, Agent
from spotrun.agent.workload import (
    GpuWaitFailed,
    WorkloadError,
    count_gpus,
    ensure_cdi_spec,
    gpu_args,
    wait_for_gpus,
)
from spotrun.clock import FakeClock
from spotrun.clouds.base import Boot
from spotrun.clouds.store import LocalStore
from spotrun.control.records import ExitRecord
from spotrun.control.state import State

PREFIX = "jobs/g1"


class QuickClock(FakeClock):
    """Fake time that moves by what is slept, while really sleeping only a little."""

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, 0.005))
        self.advance(max(0.0, seconds))


def fake_smi(folder: Path, *, ready_after: int | None) -> Path:
    """A `nvidia-smi` whose driver shows 2 GPUs from its `ready_after`-th call (None: never; it then
    fails as nvidia-smi does without a loaded driver). Calls are counted in folder/calls."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    ready = "false" if ready_after is None else f'[ "$n" -ge {ready_after} ]'
    script.write_text(
        "#!/bin/sh\n"
        f'calls="{folder}/calls"; n=$(( $(cat "$calls" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$calls"\n'
        f"if {ready}; then\n"
        '  echo "GPU 0: NVIDIA A10G (UUID: GPU-a)"; echo "GPU 1: NVIDIA A10G (UUID: GPU-b)"; exit 0\n'
        "fi\n"
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver." >&2; exit 9\n'
    )
    script.chmod(0o755)
    return folder


def run_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, ready_after: int | None) -> tuple[int, LocalStore]:
    smi = fake_smi(tmp_path / "bin", ready_after=ready_after)
    monkeypatch.setenv("PATH", f"{smi}:{os.environ['PATH']}")
    store = LocalStore(tmp_path / "store")
    job = AgentJob(job_id="g1", name="gpu", run="echo WORKLOAD_RAN", heartbeat_interval=0.1, log_flush_interval=0.1)
    store.put_bytes(jobfile.job_key(PREFIX), job.to_json().encode())
    boot = Boot(
        job_id="g1", attempt=1, store_url=store.url, job_prefix=PREFIX,
        env={"SPOTRUN_GPUS": "2", "SPOTRUN_GPU_WAIT": "120"},
    )  # fmt: skip
    code = Agent(boot, tmp_path / "root", store=store, clock=QuickClock(), tick=0.01).run()
    return code, store


def _log(store: LocalStore) -> str:
    keys = store.list(jobfile.log_prefix(PREFIX, 1))
    return b"".join(store.get_bytes(k) for k in keys).decode()


def test_the_workload_starts_once_the_driver_shows_the_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, store = run_agent(tmp_path, monkeypatch, ready_after=4)
    log = _log(store)
    assert code == 0, log
    assert int((tmp_path / "bin" / "calls").read_text()) == 4  # polled until the driver answered
    assert "waiting for the GPU driver to show 2 GPU(s)" in log and "couldn't communicate" in log
    assert "GPUs ready: nvidia-smi -L lists 2" in log
    assert log.index("GPUs ready") < log.index("WORKLOAD_RAN\n")


def test_gpus_that_never_show_end_the_attempt_as_a_boot_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, store = run_agent(tmp_path, monkeypatch, ready_after=None)
    assert code == EXIT_AGENT_ERROR
    raw = json.loads(store.get_bytes(jobfile.exit_key(PREFIX, 1)))
    assert raw["reason"] == "agent-error" and raw["kind"] == "boot"
    assert "shows 0 of 2 GPU(s) after 120s" in raw["error"] and "couldn't communicate" in raw["error"]
    assert "WORKLOAD_RAN\n" not in _log(store)  # never started on the CPU
    calls = int((tmp_path / "bin" / "calls").read_text())
    assert 120 / 5 <= calls <= 120 / 5 + 2  # bounded: one probe per 5 s of the allowance
    assert ExitRecord.parse(json.dumps(raw).encode()).kind == "boot"  # the controller's parser keeps it


def test_wait_is_bounded_and_reports_what_it_saw() -> None:
    clock = QuickClock()
    seen = iter([(0, "a"), (1, "b"), (1, "c")] + [(1, "d")] * 100)
    with pytest.raises(GpuWaitFailed, match=r"shows 1 of 4 GPU\(s\) after 30s \(d\)"):
        wait_for_gpus(4, timeout=30, now=clock.now, sleep=clock.sleep, probe=lambda: next(seen), interval=5)
    assert wait_for_gpus(1, timeout=0, now=clock.now, sleep=clock.sleep, probe=lambda: (1, "ok")) == "ok"


def test_count_without_nvidia_smi_reads_the_device_nodes(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia3"):
        (dev / name).touch()
    assert count_gpus({"PATH": str(tmp_path / "empty")}, dev=dev) == (3, f"no nvidia-smi; 3 {dev}/nvidia<N> device(s)")


def test_containers_get_the_gpus_the_agent_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # whatever /dev shows to this test process: the waited-for count decides
    assert gpu_args(["docker"], [], gpus=2) == ["--gpus", "all", "--ipc=host"]
    assert gpu_args(["podman", "--runtime", "runc"], [], gpus=2) == ["--device", "nvidia.com/gpu=all", "--ipc=host"]
    assert gpu_args(["podman"], ["--device=nvidia.com/gpu=0"], gpus=2) == ["--ipc=host"]  # the job chose
    assert gpu_args(["docker"], [], gpus=0) == ["--ipc=host"]
    # podman needs a CDI spec: generated with nvidia-ctk when none exists
    cdi = (tmp_path / "etc-cdi", tmp_path / "run-cdi")
    assert ensure_cdi_spec(["docker"], cdi) is None
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))
    with pytest.raises(WorkloadError, match="nvidia-ctk is not installed"):
        ensure_cdi_spec(["podman"], cdi)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-ctk").write_text(
        '#!/bin/sh\nout="${3#--output=}"; mkdir -p "$(dirname "$out")"; echo spec > "$out"\n'
    )
    (bin_dir / "nvidia-ctk").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert ensure_cdi_spec(["podman"], cdi) == f"generated the CDI spec {cdi[1] / 'nvidia.yaml'}"
    assert (cdi[1] / "nvidia.yaml").read_text() == "spec\n"
    assert ensure_cdi_spec(["podman"], cdi) is None  # there now


# ------------------------------------------------------------------------------- the controller side


def test_the_controller_ends_a_gpu_less_attempt_as_a_boot_failure_and_relaunches(tmp_path: Path) -> None:
    from dataclasses import replace

    from tests.test_controller import make, offer, reasons

    env = (State(tmp_path / "s.db"), LocalStore(tmp_path / "store"), FakeClock())
    cloud = replace(offer("us-east-1a", 1.0), provider="aws")  # a cloud offer: the Agent is told its GPUs
    controller, provider, job = make(env, {"us-east-1a": ["hang", ("exit", 0)]}, [cloud])
    controller.providers = {"aws": provider}
    record = {"code": None, "reason": "agent-error", "kind": "boot", "error": "the GPU driver shows 0 of 1 GPU(s)"}
    env[1].put_bytes(f"jobs/{job}/attempts/1/exit", json.dumps(record).encode())
    assert controller.run(job).exit_code == 0
    assert reasons(env[0], job) == [("us-east-1a", "boot_failed"), ("us-east-1a", "completed")]
    assert "the Agent found the VM unfit: the GPU driver shows 0 of 1" in (env[0].attempts(job)[0].detail or "")
    _, boot = provider.fate["i-1"]
    assert boot.env["SPOTRUN_GPUS"] == "1"  # the offer's count, for the Agent's wait
