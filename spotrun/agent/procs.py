"""Finding and signalling the processes of a process group or session (Linux /proc).

A workload's main process may exit before its children do (a shell killed by SIGTERM while
the Python it started is still writing a checkpoint), so "the workload is done" means "no live
process is left in its group", not "the first process exited". Zombies are dead and ignored.
Where /proc is missing, `os.killpg(pgid, 0)` is the (zombie-blind) fallback.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

_PROC = Path("/proc")


def _stat_fields(pid: str) -> tuple[str, int, int] | None:
    """(state, pgid, sid) of a process, or None if it vanished."""
    try:
        text = (_PROC / pid / "stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()  # comm may hold spaces and parentheses
    try:
        return rest[0], int(rest[2]), int(rest[3])
    except (IndexError, ValueError):
        return None


def _live(match_pgid: int | None = None, match_sid: int | None = None) -> list[int]:
    pids: list[int] = []
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is None:
            continue
        state, pgid, sid = fields
        if state in ("Z", "X"):
            continue
        if (match_pgid is not None and pgid == match_pgid) or (match_sid is not None and sid == match_sid):
            pids.append(int(entry.name))
    return sorted(pids)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    if _PROC.is_dir():
        return _live(match_pgid=pgid)
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return []
    return [pgid]


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes in session `sid` (only where /proc exists)."""
    return _live(match_sid=sid) if _PROC.is_dir() else []


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_session(sid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal every process of session `sid` (whatever process group it moved to); return them."""
    pids = session_members(sid)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    signal_group(sid, sig)  # the session leader's group, also where /proc is missing
    return pids
