"""Is a process alive? One answer for the whole package (controller lease, local instances,
checkpoint writers): zombies count as dead, and a command-line hint guards against pid reuse."""

from __future__ import annotations

import os
from pathlib import Path


def proc_state(pid: int) -> str | None:
    """The /proc state letter of `pid` ("R", "S", "Z", ...); None if unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    return rest[0] if rest else None


def pid_alive(pid: int | None, cmd_hint: str = "") -> bool:
    """Is `pid` a live (non-zombie) process, and, given a hint, one whose command line holds it?

    The hint guards against pid reuse: a recycled pid running something else is not our process.
    """
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: a recycled pid
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and dead
    except ChildProcessError:
        pass
    if not Path("/proc").is_dir():
        return True
    state = proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    if cmd_hint:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        # An empty cmdline is a process in the middle of exec (seen right after a spawn): ours.
        return not cmdline or cmd_hint.encode() in cmdline
    return True
