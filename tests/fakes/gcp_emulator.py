"""Compute Engine instances on the fake GCE that really run: the real Agent per spotrun VM.

`GCPEmulator` watches the fake (tests/fakes/gce_server.py) for RUNNING/STOPPING instances, reads
each one's startup script back into its boot record, and runs the Agent of that record with
`tests/fakes/emulator.py`. The provider already points each VM's notice watcher at the fake's
per-instance metadata path (`imds_endpoint=fake.metadata_endpoint`); the emulator only makes the
Agent poll it faster than the 1 s a real VM uses. A preemption, as Compute Engine does it:

    emu.preempt(name)   # metadata `preempted` -> TRUE, VM STOPPING, compute.instances.preempted op,
                        # and the guest's ACPI shutdown at once (SIGTERM: the Agent checkpoints)
    ... the workload checkpoints, the Agent uploads and writes its record, the guest powers off ...
    emu.reclaim(name)   # or after `preempt_grace` (GCE: 30 s): termination action DELETE deletes it

The Agents' environment (`env`) stands in for the VM's service account: it points them at the
test's object-store emulator.

Where the emulated VM image is available (tests/fakes/vm_image.py), each VM is a container that
runs its `startup-script` unmodified: the bootstrap takes the VM's service-account token from the
fake's metadata path (the provider's `imds_endpoint`, in the boot record) and reads GCS at
`STORAGE_EMULATOR_HOST`. A VM whose OS powers off by itself is TERMINATED; a deleted VM (a
reclaimed Spot VM) gets an ACPI-like shutdown: SIGTERM to every process, then `shutdown_grace`
seconds later the power is cut (GCE gives 30 s; tests scale it down).
"""

from __future__ import annotations

import signal
import subprocess
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from spotrun.clouds.base import Boot
from tests.fakes.emulator import EmulatedInstance, InstanceEmulator, VMHooks
from tests.fakes.gce_server import FakeGCE


class GCPEmulator:
    def __init__(
        self,
        gce: FakeGCE,
        root: Path,
        *,
        env: dict[str, str],
        notice_poll_interval: float = 0.2,
        interval: float = 0.05,
        shutdown_grace: float = 3.0,
        preempt_grace: float = 30.0,
        index_url: str | None = None,
    ) -> None:
        self.gce = gce
        self.preempt_grace = preempt_grace
        self.notice_poll_interval = notice_poll_interval
        self.emulator = InstanceEmulator(
            list_instances=lambda: list(gce.running_boots()),
            boot_of=lambda name: gce.running_boots()[name],
            root=root,
            env=env,
            prepare=self._prepare,
            interval=interval,
            vm=VMHooks(
                gce.startup_script,
                lambda name, _: dict(env),
                shutdown_grace=shutdown_grace,
                index_url=index_url,
                powered_off=gce.guest_shutdown,
                console=gce.serial_sources.__setitem__,
            ),
        )

    def _prepare(self, name: str, boot: Boot) -> tuple[Boot, None]:
        assert boot.notice.get("kind") == "gcp", boot.notice
        return replace(boot, notice={**boot.notice, "poll_interval": self.notice_poll_interval}), None

    def start(self) -> GCPEmulator:
        self.emulator.start()
        return self

    def stop(self) -> None:
        self.emulator.stop()

    def __enter__(self) -> GCPEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def instance(self, name: str) -> EmulatedInstance:
        return self.emulator.instance(name)

    def preempt(self, name: str, *, reclaim_after: float | None = None) -> None:
        """A Compute Engine preemption: the metadata says `preempted` and, at the same moment, the
        guest gets an ACPI shutdown (SIGTERM to its processes); the VM is stopped `preempt_grace`
        seconds later (GCE: 30 s) if the guest has not powered off by then, and deleted."""
        grace = self.preempt_grace if reclaim_after is None else reclaim_after
        self.gce.preempt(name, reclaim_after=grace)
        threading.Thread(target=self._acpi_shutdown, args=(name, grace), daemon=True).start()

    def _acpi_shutdown(self, name: str, grace: float) -> None:
        with self.emulator._lock:  # noqa: SLF001 - the emulator's own table of instances
            inst = self.emulator.started.get(name)
        if inst is None:
            return
        if inst.vm is not None:
            inst.vm.shutdown(grace)  # SIGTERM to every process, power cut after `grace`
        elif inst.process.poll() is None:
            inst.process.send_signal(signal.SIGTERM)  # the in-process Agent: its own SIGTERM handling
            try:
                inst.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass

    def reclaim(self, name: str) -> None:
        self.gce.reclaim(name)

    def wait_for(self, predicate: Any, *, timeout: float, what: str) -> Any:
        return self.emulator.wait_for(predicate, timeout=timeout, what=what)

    def report(self) -> str:
        return self.emulator.report()
