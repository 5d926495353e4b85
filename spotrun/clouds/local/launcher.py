"""Starting and hard-killing an Agent process on this machine (the local provider's instances
and the cloud emulators' instances in tests).

The Agent leads a new session; the workload it starts gets its own process group *inside*
that session, so `kill_agent` finds every process of the "instance" by session id, the way a
cloud's instance termination takes everything on the VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import spotrun
from spotrun.agent.procs import kill_session, session_members
from spotrun.clouds.base import Boot

# What a local "instance" gets from the controller's environment: what a fresh machine has (no
# credentials, no tokens), plus the job's secrets by name (SECRET_NAMES_ENV, set by the controller).
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "PYTHONPATH",
            "VIRTUAL_ENV", "XDG_RUNTIME_DIR", "CONTAINER_HOST", "DOCKER_HOST", "SPOTRUN_TERMINATE_GRACE")  # fmt: skip
SECRET_NAMES_ENV = "SPOTRUN_SECRET_ENV_NAMES"


def instance_env(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The minimal environment of a local instance (never the controller's whole environment)."""
    names = set(BASE_ENV) | {n for n in environ.get(SECRET_NAMES_ENV, "").split(",") if n}
    return {k: v for k, v in environ.items() if k in names or k.startswith("LC_")}


def spawn_agent(
    boot: Boot,
    root: Path,
    *,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    minimal_env: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `python -m spotrun.agent` for `boot` in `root`, in a new session.

    The Agent's own stdout/stderr (its notes and an echo of the workload's output) go to
    `log_path` (appended) or are discarded. `minimal_env` (the local provider) starts it with
    `instance_env` instead of this process's whole environment.
    """
    root = Path(root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    base = instance_env(os.environ) if minimal_env else dict(os.environ)
    child_env = {**base, **(env or {})}
    package_parent = str(Path(spotrun.__file__).resolve().parent.parent)
    paths = [package_parent, *filter(None, child_env.get("PYTHONPATH", "").split(os.pathsep))]
    child_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    child_env["SPOTRUN_BOOT_B64"] = boot.to_b64()
    child_env["SPOTRUN_AGENT_ROOT"] = str(root.resolve())
    if log_path is not None:
        os.close(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # private log
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "spotrun.agent"],
            cwd=root,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]


def agent_processes(agent_pid: int) -> list[int]:
    """Live processes of the Agent's session (the Agent, its workload, their children)."""
    return session_members(agent_pid)


def kill_agent(agent_pid: int, root: Path | None = None, sig: int = signal.SIGKILL) -> list[int]:
    """Take the whole "instance" down at once, as a cloud does: every process of the Agent's
    session, and the workload's container if `root` says there is one. Returns the pids hit."""
    pids = kill_session(agent_pid, sig)
    if root is not None:
        from spotrun.agent.workload import AgentPaths, remove_recorded_container

        remove_recorded_container(AgentPaths(Path(root)).meta)
    return pids
