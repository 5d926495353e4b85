"""Running the job's `setup` then `run`: as local processes, or inside a docker/podman container.

Both runners start one entry script that runs `setup` (if any), records the phase, then runs
`run`; stdout and stderr come back merged through one pipe. They differ in how they signal:

* process: the entry script leads its own process group; SIGTERM/SIGKILL go to the group, and
  the workload is alive while any process of the group is (a shell killed by SIGTERM may leave
  its Python child writing a checkpoint).
* container: the entry script is the container's PID 1; `<cli> kill --signal TERM` reaches it
  and it forwards the signal to every process in the container, then stays until they are all
  gone (PID 1 exiting would SIGKILL them). The container is named, so it can be killed and
  removed even if its client is gone; its name is recorded in `meta/container.json`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from spotrun.agent.procs import group_members, signal_group

# mount points inside a container (the checkpoint mount point comes from the job)
CTR_WORK, CTR_DATA, CTR_OUTPUT, CTR_META = "/work", "/data", "/output", "/spotrun"
CTR_LIB = "/opt/spotrun-lib"  # the Agent's own spotrun tree, read-only: `import spotrun.checkpoint`

# Where images keep a separate PyTorch environment (tried in order when the job has no `image:`):
# $SPOTRUN_PYTHON_ENV, the emulated test image's, the AWS Deep Learning AMIs' conda env, conda.
PYTORCH_ENVS = ("/opt/pytorch/bin", "/opt/conda/envs/pytorch/bin", "/opt/conda/bin")
# Set by the VM bootstrap (clouds/vmboot.py): the folder holding the Agent's `spotrun` package and
# nothing else, so a workload on another Python imports spotrun.checkpoint, never the Agent's deps.
LIB_ENV = "SPOTRUN_CHECKPOINT_PYTHONPATH"


def process_runtime_env(env: dict[str, str], shims: Path) -> dict[str, str]:
    """The default runtime (no `image:`): the image's PyTorch environment first on PATH, a `python`
    command even where the image has only `python3` (Ubuntu), and spotrun.checkpoint importable.

    Only on a VM the bootstrap installed (LIB_ENV set): a local instance keeps its caller's PATH."""
    lib = env.get(LIB_ENV)
    if not lib:
        return env
    out = dict(env)
    current = out.get("PYTHONPATH", "")
    user_path = "" if current == os.environ.get("PYTHONPATH", "") else current  # the job's own, kept
    out["PYTHONPATH"] = os.pathsep.join(p for p in (lib, user_path) if p)
    found = [out["SPOTRUN_PYTHON_ENV"]] if out.get("SPOTRUN_PYTHON_ENV") else []
    found += [d for d in PYTORCH_ENVS if Path(d, "python").exists()]
    path = os.pathsep.join([*found[:1], out.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
    if shutil.which("python", path=path) is None and (python3 := shutil.which("python3", path=path)):
        shims.mkdir(parents=True, exist_ok=True)
        link = shims / "python"
        if not link.exists():
            link.symlink_to(python3)
        path = os.pathsep.join([str(shims), path])
    out["PATH"] = path
    return out


# --------------------------------------------------------------------------- GPUs

GPUS_ENV = "SPOTRUN_GPUS"  # the offer's GPU count, set by the controller for cloud launches
GPU_WAIT_ENV = "SPOTRUN_GPU_WAIT"  # seconds to wait for the driver to show them (default 600)
DEFAULT_GPU_WAIT = 600.0  # a first-boot driver install (GCP's DLVM) takes a few minutes
GPU_POLL_INTERVAL = 5.0
_NVIDIA_DEV = re.compile(r"nvidia[0-9]+")


class GpuWaitFailed(Exception):
    """The driver never showed the offer's GPUs: a boot failure, not the workload's."""


def count_gpus(env: dict[str, str] | None = None, dev: Path = Path("/dev")) -> tuple[int, str]:
    """(GPUs the NVIDIA driver shows, how that was seen). `nvidia-smi -L` (one "GPU <i>: ..." line
    per GPU) on the env's PATH; without nvidia-smi, the `/dev/nvidia<N>` device nodes. A
    nvidia-smi that fails (driver not loaded yet) counts 0."""
    path = (env or os.environ).get("PATH", os.defpath)
    smi = shutil.which("nvidia-smi", path=path)
    if smi is not None:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return 0, f"nvidia-smi -L: {e}"
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            return 0, f"nvidia-smi -L: {last[0][:200]}"
        found = sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))
        return found, f"nvidia-smi -L lists {found}"
    try:
        nodes = [p.name for p in dev.iterdir() if _NVIDIA_DEV.fullmatch(p.name)]
    except OSError:
        nodes = []
    return len(nodes), f"no nvidia-smi; {len(nodes)} {dev}/nvidia<N> device(s)"


def wait_for_gpus(
    expected: int,
    *,
    timeout: float,
    now: Callable[[], float],
    sleep: Callable[[float], None],
    probe: Callable[[], tuple[int, str]] = count_gpus,
    interval: float = GPU_POLL_INTERVAL,
    note: Callable[[str], None] = lambda _m: None,
    stop: Callable[[], None] = lambda: None,
) -> str:
    """Poll `probe` until it shows `expected` GPUs (what it saw), or raise GpuWaitFailed once
    `timeout` seconds passed. `stop` is called between polls (the Agent checks for a notice)."""
    start = now()
    found, how = probe()
    if found >= expected:
        return how
    note(f"waiting for the GPU driver to show {expected} GPU(s): {how}")
    while now() - start < timeout:
        sleep(min(interval, max(0.0, timeout - (now() - start))))
        stop()
        found, how = probe()
        if found >= expected:
            note(f"{how} after {now() - start:.0f}s")
            return how
    raise GpuWaitFailed(
        f"the GPU driver shows {found} of {expected} GPU(s) after {timeout:.0f}s ({how}): "
        "the image has no working driver for this GPU"
    )


def gpu_args(cli: list[str], extra_args: list[str], *, gpus: int | None = None) -> list[str]:
    """How this container CLI passes every GPU, and a shared-memory size fit for DataLoader workers:
    docker `--gpus all`; podman through CDI (`--device nvidia.com/gpu=all`); `--ipc=host` unless
    the job chose --ipc or --shm-size itself. `gpus` is the count the Agent waited for (then the
    GPUs are passed whatever /dev shows); None: only when /dev/nvidia0 exists (a local run)."""
    args: list[str] = []
    has_gpu = gpus > 0 if gpus is not None else Path("/dev/nvidia0").exists()
    if _flavor(cli) == "docker" and has_gpu and "--gpus" not in extra_args:
        args += ["--gpus", "all"]
    device_given = any(a == "--device" or a.startswith("--device=") for a in extra_args)
    if _flavor(cli) == "podman" and has_gpu and not device_given:
        args += ["--device", "nvidia.com/gpu=all"]  # CDI: podman names the missing spec if there is none
    if not any(a.startswith(("--ipc", "--shm-size")) for a in extra_args):
        args += ["--ipc=host"]
    return args


def own_process_group() -> dict[str, Any]:
    """Popen arguments that start the child in a process group of its own (same session).
    `process_group=` is 3.11+; the Agent also runs on a VM's Python 3.9, where `setpgid` in the
    child (`preexec_fn`) does the same."""
    if sys.version_info >= (3, 11):  # noqa: UP036 -- the VM's python3 may be 3.9
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}


class WorkloadError(Exception):
    """The workload could not be started (no container runtime, image pull failed...)."""


@dataclass(frozen=True)
class AgentPaths:
    """The Agent's folders under its root."""

    root: Path

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def meta(self) -> Path:
        """Notice, progress and phase files and the entry scripts (mounted in a container)."""
        return self.root / "meta"

    @property
    def mounts(self) -> Path:
        """Data entries with an absolute target, each mounted at that path in a container."""
        return self.root / "mounts"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def notice_file(self) -> Path:
        return self.meta / "notice.json"

    @property
    def progress_file(self) -> Path:
        return self.meta / "progress.json"

    @property
    def phase_file(self) -> Path:
        return self.meta / "phase"

    def prepare(self) -> None:
        """Start from empty folders: an instance never reuses what an earlier run left."""
        for folder in (self.work, self.data, self.checkpoints, self.output, self.meta, self.mounts, self.tmp):
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)


class Workload(ABC):
    """A started setup+run. `output` yields the merged stdout/stderr bytes until EOF."""

    output: IO[bytes]

    @abstractmethod
    def exit_code(self) -> int | None:
        """The entry script's exit code once it ended (negative: killed by that signal)."""

    @abstractmethod
    def alive(self) -> bool:
        """Whether any process of the workload is still running."""

    @abstractmethod
    def terminate(self) -> None:
        """Ask the workload to stop (SIGTERM to all of it)."""

    @abstractmethod
    def kill(self) -> None:
        """Stop it now (SIGKILL to all of it). Idempotent."""

    def cleanup(self) -> None:
        """Once it ended: remove whatever is left behind (stray processes, the container)."""
        self.kill()


def _write_scripts(paths: AgentPaths, setup: str | None, run: str) -> None:
    """The user's commands, as meta/setup.sh and meta/run.sh."""
    (paths.meta / "run.sh").write_text(run + "\n")
    if setup:
        (paths.meta / "setup.sh").write_text(setup + "\n")


def _steps(setup: str | None, shell: str, meta: str) -> str:
    """The setup-then-run part of the entry script; `meta` is the meta folder as the workload sees it."""
    q = shlex.quote
    lines = []
    if setup:
        lines.append(f"printf setup > {q(meta + '/phase')}")
        lines.append(f"{shell} {q(meta + '/setup.sh')} || exit $?")
    lines.append(f"printf running > {q(meta + '/phase')}")
    lines.append(f"exec {shell} {q(meta + '/run.sh')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- processes


class ProcessWorkload(Workload):
    def __init__(self, paths: AgentPaths, setup: str | None, run: str, env: dict[str, str]) -> None:
        shell = shutil.which("bash") or "/bin/sh"
        meta = str(paths.meta)
        _write_scripts(paths, setup, run)
        entry = paths.meta / "entry.sh"
        entry.write_text("# spotrun entry: setup, then run\n" + _steps(setup, shlex.quote(shell), meta) + "\n")
        self._proc = subprocess.Popen(
            ["/bin/sh", str(entry)],
            cwd=paths.work,
            env=process_runtime_env(env, paths.meta / "shims"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **own_process_group(),  # its own group, same session as the Agent (see launcher.kill_agent)
        )
        assert self._proc.stdout is not None
        self.output = self._proc.stdout
        self.pid = self._proc.pid

    def exit_code(self) -> int | None:
        return self._proc.poll()

    def alive(self) -> bool:
        return self._proc.poll() is None or bool(group_members(self.pid))

    def terminate(self) -> None:
        signal_group(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        signal_group(self.pid, signal.SIGKILL)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------- containers

# PID 1 in the container: forwards SIGTERM to every other process (kill -1), and after a
# SIGTERM waits until no live process is left, so the workload gets its full grace period.
_CONTAINER_ENTRY = """# spotrun container entry (PID 1)
term=0
trap 'term=1; kill -TERM -1 2>/dev/null' TERM INT
(
{steps}
) &
child=$!
while :; do
  wait "$child"; rc=$?
  kill -0 "$child" 2>/dev/null || break
done
while [ "$term" = 1 ]; do
  left=0
  for d in /proc/[0-9]*; do
    p=${{d#/proc/}}
    [ "$p" = 1 ] && continue
    read -r line < "$d/stat" 2>/dev/null || continue
    st=${{line##*) }}; st=${{st%% *}}
    [ "$st" = Z ] || left=1
  done
  [ "$left" = 0 ] && break
  sleep 0.1 2>/dev/null || sleep 1
done
exit "$rc"
"""


def _flavor(cli: list[str]) -> str:
    return Path(cli[0]).name


def detect_container_cli() -> list[str]:
    """The first of docker, podman whose engine answers (a docker client without a daemon
    does not count)."""
    for name in ("docker", "podman"):
        if shutil.which(name) is None:
            continue
        try:
            ok = subprocess.run([name, "info"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return [name]
    raise WorkloadError("the job has an image but neither docker nor podman works on this machine")


def container_cli(configured: str | None, env: dict[str, str] | None = None) -> list[str]:
    """The container command: the job's `container_cli`, else $SPOTRUN_CONTAINER_CLI, else
    detected. It may carry global flags, e.g. "podman --runtime runc --cgroup-manager=cgroupfs"."""
    text = configured or (env or os.environ).get("SPOTRUN_CONTAINER_CLI")
    cli = shlex.split(text) if text else detect_container_cli()
    if _flavor(cli) not in ("docker", "podman"):
        raise WorkloadError(f"container_cli must be docker or podman, not {cli[0]!r}")
    if shutil.which(cli[0]) is None:
        raise WorkloadError(f"container CLI {cli[0]!r} is not installed")
    return cli


def container_name(job_id: str, attempt: int) -> str:
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", job_id)[:40]
    return f"spotrun-{safe}-a{attempt}-{secrets.token_hex(3)}"


class ContainerWorkload(Workload):
    def __init__(
        self,
        paths: AgentPaths,
        setup: str | None,
        run: str,
        env: dict[str, str],
        *,
        image: str,
        cli: list[str],
        name: str,
        checkpoint_dir: str,
        extra_args: list[str],
        gpus: int | None = None,
    ) -> None:
        self.cli, self.name = cli, name
        _write_scripts(paths, setup, run)
        steps = _steps(setup, "sh", CTR_META)
        (paths.meta / "entry.sh").write_text(_CONTAINER_ENTRY.format(steps=steps))
        (paths.meta / "container.json").write_text(json.dumps({"cli": cli, "name": name}))
        args = [*cli, "run", "--rm", "--name", name, "-w", CTR_WORK]
        for host, ctr in (
            (paths.work, CTR_WORK),
            (paths.checkpoints, checkpoint_dir),
            (paths.data, CTR_DATA),
            (paths.output, CTR_OUTPUT),
            (paths.meta, CTR_META),
        ):
            args += ["-v", f"{host}:{ctr}"]
        lib = os.environ.get(LIB_ENV)
        if lib:  # the Agent's spotrun (pure Python), so `import spotrun.checkpoint` works as is
            args += ["-v", f"{lib}:{CTR_LIB}:ro"]
            env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (CTR_LIB, env.get("PYTHONPATH", "")) if p)}
        for key in sorted(env):
            args += ["-e", key]  # names only: values travel in the client's environment, not argv
        args += gpu_args(cli, extra_args, gpus=gpus)
        args += [*extra_args, image, "sh", f"{CTR_META}/entry.sh"]
        self._proc = subprocess.Popen(
            args,
            cwd=paths.work,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **own_process_group(),
        )
        assert self._proc.stdout is not None
        self.output = self._proc.stdout
        self.pid = self._proc.pid
        self._removed = False

    def _cli(self, *args: str, timeout: float = 30) -> bool:
        try:
            done = subprocess.run([*self.cli, *args], capture_output=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def exit_code(self) -> int | None:
        return self._proc.poll()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def terminate(self) -> None:
        if not self._cli("kill", "--signal", "TERM", self.name):
            signal_group(self.pid, signal.SIGTERM)  # not created yet: the client proxies signals

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._cli("kill", "--signal", "KILL", self.name)
        signal_group(self.pid, signal.SIGKILL)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def cleanup(self) -> None:
        self.kill()
        if not self._removed:
            self._cli("rm", "-f", self.name)
            self._removed = True


CDI_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))


def ensure_cdi_spec(cli: list[str], dirs: tuple[Path, ...] = CDI_DIRS) -> str | None:
    """podman reaches NVIDIA GPUs through a CDI spec: generate one with the NVIDIA Container
    Toolkit (`nvidia-ctk cdi generate`) when none exists. Returns what was done, None for docker
    or when a spec is there; WorkloadError when podman would get no GPU."""
    if _flavor(cli) != "podman" or any(d.is_dir() and any(d.glob("nvidia*")) for d in dirs):
        return None
    ctk = shutil.which("nvidia-ctk")
    if ctk is None:
        raise WorkloadError(
            "podman needs a CDI spec for the GPUs (/etc/cdi/nvidia.yaml) and nvidia-ctk is not installed"
        )
    target = dirs[-1] / "nvidia.yaml"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkloadError(f"cannot create {target.parent} for the CDI spec: {e}") from e
    done = subprocess.run([ctk, "cdi", "generate", f"--output={target}"], capture_output=True, text=True)
    if done.returncode != 0:
        raise WorkloadError(f"nvidia-ctk cdi generate failed: {done.stderr.strip()[-300:]}")
    return f"generated the CDI spec {target}"


def ensure_image(cli: list[str], image: str) -> None:
    """Pull the image unless it is already there."""
    if subprocess.run([*cli, "image", "inspect", image], capture_output=True).returncode == 0:
        return
    pulled = subprocess.run([*cli, "pull", image], capture_output=True, text=True)
    if pulled.returncode != 0:
        raise WorkloadError(f"could not pull image {image}: {pulled.stderr.strip()[-500:]}")


def remove_recorded_container(meta: Path) -> None:
    """Force-remove the container recorded in `meta/container.json`, if any (hard kill path)."""
    try:
        rec = json.loads((meta / "container.json").read_text())
    except (OSError, ValueError):
        return
    try:
        subprocess.run([*rec["cli"], "rm", "-f", rec["name"]], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired, KeyError, TypeError):
        pass
