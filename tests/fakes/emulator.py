"""The cloud-independent half of an instance emulator: "instances" that run the real Agent.

A fake cloud (moto, the GCE or ARM fakes) only keeps records of instances. `InstanceEmulator`
turns each record into a running machine: it polls `list_instances()` (the ids of live instances),
and for every new one reads its boot record (`boot_of`, e.g. from user-data), lets the cloud part
`prepare` it (start a metadata server, point the notice watcher at it), and starts the real Agent
with `spotrun.clouds.local.launcher.spawn_agent` in a folder of its own. When an id disappears from the
listing (terminated, preempted) the Agent's whole session is SIGKILLed at once, as a VM that is
switched off, and the cloud part may `release` what it prepared.

    emulator = InstanceEmulator(list_instances=..., boot_of=..., root=tmp_path, env={...})
    with emulator:
        ...  # the controller launches; the emulator runs the Agents
        emulator.wait_for(lambda: ..., timeout=20, what="the first checkpoint")

The clouds' emulators (tests/fakes/aws_emulator.py, ...) wrap this with their own listing,
metadata server and "preempt this instance" helpers.

With `vm=VMHooks(...)` and the emulated VM image available (tests/fakes/vm_image.py), an instance
is a real operating system instead: a container over a Debian 11 image with Python 3.9 that runs
the user-data the provider sent, unmodified, as root (bootstrap → Agent → workload). Where the
image cannot run here, the emulator falls back to the in-process Agent above and says so
(`mode`, `why_not_vm`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotrun.clouds.base import Boot
from tests.fakes import vm_image

FAKE_GPU_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "fake_gpu"
log = logging.getLogger(__name__)


@dataclass
class VMHooks:
    """What a cloud's emulator tells the VM mode: the raw user-data of an instance, the VM's
    environment (its endpoints: the stand-ins for link-local metadata and the cloud's DNS), how
    its shutdown goes (`shutdown_grace` seconds of SIGTERM first, as GCE's and Azure's ACPI stop;
    None: the power is cut at once) and its package index (None: the image's wheelhouse)."""

    script_of: Callable[[str], str]
    env_of: Callable[[str, Any], dict[str, str]]
    shutdown_grace: float | None = None
    index_url: str | None = None
    powered_off: Callable[[str], None] | None = None  # the VM's OS ended by itself: tell the cloud
    console: Callable[[str, Callable[[], str]], None] | None = None  # give the cloud the VM's serial console


@dataclass
class EmulatedInstance:
    instance_id: str
    boot: Boot  # as handed to the Agent (after `prepare`)
    root: Path  # the instance's "disk": the Agent's working folder
    log_path: Path  # the Agent's own stdout/stderr
    process: subprocess.Popen[bytes]
    handle: Any = None  # what `prepare` returned for it (e.g. its metadata server)
    vm: vm_image.VM | None = None  # in VM mode: the container (log_path is its console)
    powered_off: bool = False  # in VM mode: its script ended and the cloud was told
    started_at: float = field(default_factory=time.time)
    stopped_at: float | None = None  # when the emulator killed it (the instance went away)

    @property
    def agent_exit(self) -> int | None:
        """The Agent's exit status once it ended by itself or was killed; None while it runs."""
        return self.process.poll()

    def agent_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


Prepare = Callable[[str, Boot], tuple[Boot, Any]]


class InstanceEmulator:
    def __init__(
        self,
        *,
        list_instances: Callable[[], Iterable[str]],
        boot_of: Callable[[str], Boot],
        root: Path,
        env: dict[str, str] | None = None,
        prepare: Prepare | None = None,
        release: Callable[[str, Any], None] | None = None,
        interval: float = 0.05,
        vm: VMHooks | None = None,
    ) -> None:
        self.why_not_vm = vm_image.unavailable() if vm is not None else "no VM hooks given"
        self.vm = vm if self.why_not_vm is None else None
        self.mode = "vm" if self.vm is not None else "process"
        if vm is not None and self.vm is None:
            log.warning("instance emulator: in-process Agents, not VMs: %s", self.why_not_vm)
        self.list_instances = list_instances
        self.boot_of = boot_of
        self.root = Path(root)
        # the instance's `python` is this interpreter (as a Deep Learning AMI comes with torch)
        # and its GPUs answer `nvidia-smi -L` (tests/fixtures/fake_gpu: the Agent waits for them)
        path = os.pathsep.join(
            [str(FAKE_GPU_DIR), str(Path(sys.executable).parent), (env or {}).get("PATH", os.environ.get("PATH", ""))]
        )
        self.env = {**(env or {}), "PATH": path}
        self.prepare = prepare
        self.before_boot: Callable[[Boot], None] | None = None  # a test's hook, run as each instance boots
        self.release = release
        self.interval = interval
        self.started: dict[str, EmulatedInstance] = {}  # every instance ever run, by id
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> InstanceEmulator:
        self._thread = threading.Thread(target=self._loop, name="instance-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching and switch off every instance still running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            running = [i for i in self.started.values() if i.stopped_at is None]
        for inst in running:
            self._switch_off(inst)

    def __enter__(self) -> InstanceEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries

    def instance(self, instance_id: str) -> EmulatedInstance:
        with self._lock:
            return self.started[instance_id]

    def running(self) -> list[EmulatedInstance]:
        """Instances whose machine is on (the Agent may have finished; the VM is still up)."""
        with self._lock:
            return [i for i in self.started.values() if i.stopped_at is None]

    def wait_for(self, predicate: Callable[[], Any], *, timeout: float, what: str, step: float = 0.05) -> Any:
        """Poll `predicate` until it returns something truthy; fail with the Agents' logs if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(step)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.report()}")

    def report(self) -> str:
        """Every instance's Agent log, and emulator errors: what a failing test should print."""
        parts = [f"emulator errors: {self.errors}"] if self.errors else []
        parts.append(f"instances ran as: {self.mode}" + (f" ({self.why_not_vm})" if self.mode != "vm" else ""))
        with self._lock:
            instances = list(self.started.values())
        for inst in instances:
            parts.append(f"--- {inst.instance_id} (agent exit {inst.agent_exit}) ---\n{inst.agent_log()[-4000:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 -- keep emulating; the test sees `errors`
                log.warning("instance emulator tick failed: %s", exc)
                self.errors.append(repr(exc))
            self._stop.wait(self.interval)

    def tick(self) -> None:
        """One look at the cloud: boot the new instances, switch off those that went away."""
        live = set(self.list_instances())
        with self._lock:
            known = dict(self.started)
        for instance_id in sorted(live - set(known)):
            self._boot(instance_id)
        for instance_id, inst in known.items():  # a VM whose script ended powered itself off
            if inst.vm is not None and not inst.vm.alive() and not inst.powered_off:
                inst.powered_off = True
                if instance_id in live and self.vm is not None and self.vm.powered_off is not None:
                    self.vm.powered_off(instance_id)
        for instance_id, inst in known.items():
            if instance_id not in live and inst.stopped_at is None:
                self._switch_off(inst)

    def _boot(self, instance_id: str) -> None:
        from spotrun.clouds.local.launcher import spawn_agent

        boot = self.boot_of(instance_id)
        if self.before_boot is not None:
            self.before_boot(boot)
        handle = None
        if self.prepare is not None:
            boot, handle = self.prepare(instance_id, boot)
        root = self.root / instance_id
        root.mkdir(parents=True, exist_ok=True)
        log_path = root.parent / f"{instance_id}.agent.log"
        if self.vm is not None:
            script = self.vm.script_of(instance_id)
            env = self.vm.env_of(instance_id, handle)
            name = f"{vm_image.vm_prefix()}{instance_id}"[:120]
            smi = {FAKE_GPU_DIR / "nvidia-smi": "/usr/local/bin/nvidia-smi"}  # the VM's GPUs (see fake_gpu)
            vm = vm_image.start_vm(name, script, env=env, console=log_path, index_url=self.vm.index_url, mounts=smi)
            if self.vm.console is not None:
                self.vm.console(instance_id, vm.read_console)
            with self._lock:
                self.started[instance_id] = EmulatedInstance(instance_id, boot, root, log_path, vm.process, handle, vm)
            return
        process = spawn_agent(boot, root, env=self.env, log_path=log_path)
        with self._lock:
            self.started[instance_id] = EmulatedInstance(instance_id, boot, root, log_path, process, handle)

    def _switch_off(self, inst: EmulatedInstance) -> None:
        """The VM is gone: every process of it dies at once (SIGKILL), its metadata server too."""
        from spotrun.clouds.local.launcher import kill_agent

        if inst.vm is not None:
            grace = self.vm.shutdown_grace if self.vm is not None else None
            inst.vm.shutdown(grace) if grace else inst.vm.kill()
            if inst.vm.alive():
                self.errors.append(f"VM {inst.instance_id} survived its power-off")
        else:
            kill_agent(inst.process.pid, inst.root)
            try:
                inst.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.errors.append(f"agent of {inst.instance_id} survived SIGKILL")
        inst.stopped_at = time.time()
        if self.release is not None:
            self.release(inst.instance_id, inst.handle)
