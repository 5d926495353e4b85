"""The workload's runtime on a VM (spotrun/agent/workload.py): without `image:`, the image's PyTorch
environment first on PATH, a `python` command, and only the Agent's spotrun tree on PYTHONPATH;
with `image:`, the GPU and shared-memory flags of the container CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotrun.agent import workload
from spotrun.agent.workload import LIB_ENV, gpu_args, process_runtime_env


def test_without_the_bootstrap_nothing_changes(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin", "PYTHONPATH": "/x"}
    assert process_runtime_env(env, tmp_path / "shims") == env  # a local instance keeps its caller's runtime


def test_the_pytorch_env_comes_first_and_python_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch_env = tmp_path / "opt-pytorch-bin"
    torch_env.mkdir()
    (torch_env / "python").write_text("#!/bin/sh\n")
    (torch_env / "python").chmod(0o755)
    monkeypatch.setattr(workload, "PYTORCH_ENVS", ("/nonexistent/bin", str(torch_env)))
    monkeypatch.setenv("PYTHONPATH", "/opt/spotrun/abc/src:/opt/spotrun/abc/deps")  # the Agent's own
    env = {"PATH": "/usr/bin:/bin", LIB_ENV: "/opt/spotrun/abc/src", "PYTHONPATH": os.environ["PYTHONPATH"]}
    out = process_runtime_env(env, tmp_path / "shims")
    assert out["PATH"].split(os.pathsep)[0] == str(torch_env)
    assert out["PYTHONPATH"] == "/opt/spotrun/abc/src"  # never the Agent's 3.9 dependencies


def test_ubuntu_without_python_gets_a_shim_and_the_jobs_pythonpath_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\n")
    (bin_dir / "python3").chmod(0o755)
    monkeypatch.setattr(workload, "PYTORCH_ENVS", ())
    monkeypatch.setenv("PYTHONPATH", "/agent")
    env = {"PATH": str(bin_dir), LIB_ENV: "/lib", "PYTHONPATH": "/job/src"}
    out = process_runtime_env(env, tmp_path / "shims")
    assert out["PATH"].split(os.pathsep)[0] == str(tmp_path / "shims")
    assert (tmp_path / "shims" / "python").resolve() == (bin_dir / "python3").resolve()
    assert out["PYTHONPATH"] == os.pathsep.join(["/lib", "/job/src"])


def test_gpu_and_shared_memory_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_exists = Path.exists
    gpus = {"/dev/nvidia0": True}
    monkeypatch.setattr(Path, "exists", lambda p: gpus.get(str(p), real_exists(p)))
    assert gpu_args(["docker"], []) == ["--gpus", "all", "--ipc=host"]
    assert gpu_args(["docker"], ["--gpus", "device=0", "--shm-size", "8g"]) == []
    monkeypatch.setattr(Path, "glob", lambda p, pattern: [p / "nvidia.yaml"] if str(p) == "/etc/cdi" else [])
    assert gpu_args(["podman"], []) == ["--device", "nvidia.com/gpu=all", "--ipc=host"]
    gpus["/dev/nvidia0"] = False
    assert gpu_args(["podman"], ["--ipc=private"]) == []  # no GPU here; the job chose its IPC
