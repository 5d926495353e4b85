"""The "hypervisor" of one local instance: boots it, runs the Agent, and takes it back.

    python -m spotrun.clouds.local.host <sandbox>

The local provider starts one of these per instance, detached in its own session, so instances
outlive the controller that launched them, as cloud VMs do. It reads `<sandbox>/instance.json`
(written once by the provider: the boot record, the market's plan for this instance), then:

1. waits the boot delay (status "pending"), then starts the Agent (status "running");
2. at the planned preemption time (or when the provider asks, `control/preempt.json`) writes the
   notice file the Agent watches, `meta/notice.json` = `{"deadline": <epoch>}`, and when the
   notice period is over (or the Agent has exited) kills every process of the instance and
   records "preempted";
3. when the Agent exits by itself, records "exited" with its exit code;
4. on `control/terminate` (or SIGTERM) kills every process of the instance and records
   "terminated".

When the instance ends, its disk (`<sandbox>/root`, the Agent's folder) is deleted, as a cloud
deletes a terminated VM's disk; `agent.log` (its console) and the state stay.

"Every process of the instance" is found two ways: the Agent's session (it starts in its own)
and an environment marker, `SPOTRUN_LOCAL_INSTANCE=<id>`, that every process it starts
inherits, so a workload that moved to a session of its own is found too. The state file,
`<sandbox>/state.json`, is only ever replaced atomically: the provider polls it about once a
second. The helpers at the bottom are shared with the provider (`spotrun.clouds.local.provider`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from spotrun.pids import proc_state

MARKER_ENV = "SPOTRUN_LOCAL_INSTANCE"
TICK = 0.05  # seconds between checks: preemption timing is this precise
FINAL = ("exited", "preempted", "terminated", "failed")

STATE = "state.json"
CONFIG = "instance.json"
HOST_PID = "host.pid"
NOTICE = "meta/notice.json"
TERMINATE = "control/terminate"
PREEMPT = "control/preempt.json"


# --------------------------------------------------------------------------- shared helpers


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marked_processes(instance_id: str) -> list[int]:
    """Live processes carrying this instance's environment marker (Linux; [] elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    needle = f"{MARKER_ENV}={instance_id}".encode()
    me = os.getpid()
    found = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and proc_state(int(entry.name)) not in (None, "Z", "X"):
            found.append(int(entry.name))
    return found


def kill_instance(instance_id: str, groups: list[int], *, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process of the instance (its process groups/sessions and every process with
    its marker), repeatedly until none is left or `timeout` passes. Returns the survivors."""
    end = time.monotonic() + timeout
    while True:
        for pgid in groups:
            if pgid and pgid > 1:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        left = marked_processes(instance_id)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not left:
            return []
        if time.monotonic() > end:
            return marked_processes(instance_id)
        time.sleep(0.01)


def take_down(instance_id: str, agent_pid: int | None, agent_root: Path | None) -> list[int]:
    """Everything of the instance dies, as when a cloud takes a VM: the Agent's session and the
    container it recorded (the Agent's own hard-kill path), then every marked process."""
    if agent_pid:
        try:
            from spotrun.clouds.local.launcher import kill_agent
        except ImportError:
            pass
        else:
            kill_agent(agent_pid, agent_root)
    return kill_instance(instance_id, [agent_pid or 0])


# --------------------------------------------------------------------------- the hypervisor


class Host:
    def __init__(self, sandbox: Path) -> None:
        self.sandbox = sandbox
        cfg = read_json(sandbox / CONFIG)
        if cfg is None:
            raise SystemExit(f"local_host: no readable {sandbox / CONFIG}")
        self.cfg = cfg
        self.instance_id: str = cfg["instance"]["instance_id"]
        self.plan: dict[str, Any] = cfg["plan"]
        self.launched = float(cfg["launched_real"])
        self.state: dict[str, Any] = read_json(sandbox / STATE) or {}
        self.agent: subprocess.Popen[bytes] | None = None
        self.stop_requested = False

    # ---------------------------------------------------------------- state

    def _set(self, **changes: Any) -> None:
        self.state.update(changes, updated=time.time())
        write_json_atomic(self.sandbox / STATE, self.state)

    def _finish(self, status: str, *, exit_code: int | None = None, reason: str = "") -> int:
        agent_pid = self.agent.pid if self.agent is not None else None
        survivors = take_down(self.instance_id, agent_pid, self.sandbox / "root")
        if self.agent is not None:
            try:
                self.agent.wait(timeout=5)
            except subprocess.TimeoutExpired:
                survivors.append(self.agent.pid)
        if survivors:
            reason = f"{reason}; processes that would not die: {survivors}".lstrip("; ")
        shutil.rmtree(self.sandbox / "root", ignore_errors=True)  # the instance's disk goes with it,
        self._set(status=status, exit_code=exit_code, reason=reason, ended_at=time.time())  # then it reports
        return 0

    # ---------------------------------------------------------------- control

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _terminate_requested(self) -> bool:
        return self.stop_requested or (self.sandbox / TERMINATE).exists()

    def _preempt_request(self) -> dict[str, Any] | None:
        return read_json(self.sandbox / PREEMPT)

    # ---------------------------------------------------------------- agent

    def _spawn_agent(self) -> subprocess.Popen[bytes]:
        from spotrun.clouds.base import Boot

        boot = Boot(**self.cfg["boot"])
        root = self.sandbox / "root"
        root.mkdir(parents=True, exist_ok=True)
        env = {MARKER_ENV: self.instance_id, "SPOTRUN_AGENT_ROOT": str(root)}
        # The instance's "machine image" is this Python environment: `python`, `pip` and the tools
        # installed beside it come first on PATH, as on a cloud image with spotrun installed.
        env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), os.environ.get("PATH", "")) if p)
        log_path = self.sandbox / "agent.log"
        command = self.cfg.get("agent_command")
        if command:  # a stand-in Agent (tests, debugging): same contract, boot record in the env
            env["SPOTRUN_BOOT_B64"] = boot.to_b64()
            with open(log_path, "ab") as log:
                return subprocess.Popen(
                    command,
                    cwd=root,
                    env={**os.environ, **env},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        from spotrun.clouds.local.launcher import spawn_agent

        return spawn_agent(boot, root, env=env, log_path=log_path, minimal_env=True)

    # ---------------------------------------------------------------- the life of an instance

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.state.get("status") in FINAL:  # ended (terminated) before this process got going
            return 0
        self._set(status="pending", host_pid=os.getpid(), exit_code=None, reason="")
        preempt_in = self.plan.get("preempt_in")
        preempt_at = None if preempt_in is None else self.launched + float(preempt_in)
        start_at = self.launched + float(self.plan.get("boot", 0.0))
        notice = float(self.plan.get("notice", 0.0))

        while True:  # booting
            if self._terminate_requested():
                return self._finish("terminated", reason="terminated while booting")
            if self._preempt_request() is not None or (preempt_at is not None and time.time() >= preempt_at):
                return self._finish("preempted", reason="preempted while booting")
            if time.time() >= start_at:
                break
            time.sleep(TICK)

        self.agent = self._spawn_agent()
        self._set(status="running", agent_pid=self.agent.pid, started_at=time.time())

        deadline: float | None = None
        cause, given = "", notice
        while True:
            code = self.agent.poll()
            now = time.time()
            if code is not None:
                code = code if code >= 0 else 128 - code  # killed by signal N: 128+N, as shells say
                if deadline is not None:
                    why = f"preempted {cause}; the Agent exited during the notice"
                    return self._finish("preempted", exit_code=code, reason=why)
                why = "" if code == 0 else f"the Agent exited with {code}"
                return self._finish("exited", exit_code=code, reason=why)
            if self._terminate_requested():
                return self._finish("terminated", reason="terminated by request")
            if deadline is None:
                request = self._preempt_request()
                if request is not None or (preempt_at is not None and now >= preempt_at):
                    cause = "on request" if request is not None else f"by the market ({self.plan.get('cause', '')})"
                    if request is not None and request.get("notice") is not None:
                        given = float(request["notice"])
                    if given <= 0:
                        return self._finish("preempted", reason=f"preempted {cause}, without notice")
                    deadline = now + given
                    write_json_atomic(self.sandbox / NOTICE, {"deadline": deadline, "issued_at": now, "notice": given})
                    self._set(notice_at=now, deadline=deadline, reason=f"preemption notice {cause}: {given:g}s")
            elif now >= deadline:
                return self._finish("preempted", reason=f"preempted {cause} after a {given:g}s notice")
            time.sleep(TICK)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m spotrun.clouds.local.host <sandbox>", file=sys.stderr)
        return 2
    host = Host(Path(args[0]))
    try:
        return host.run()
    except Exception:
        traceback.print_exc()
        try:
            host._finish("failed", reason="hypervisor error: " + traceback.format_exc(limit=1).strip().splitlines()[-1])
        except Exception:
            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
