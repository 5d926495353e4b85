"""Azure VMs on the fake ARM that really run: the real Agent per spotrun VM.

`AzureEmulator` watches the fake (tests/fakes/azure_server.py) for running VMs, decodes each one's
custom data back into its boot record, and runs the Agent of that record with
`tests/fakes/emulator.py`. The provider already points each VM's watcher at the fake's per-VM
Scheduled Events path (`imds_endpoint=fake.metadata_endpoint`); the emulator only makes the Agent
poll it faster. An eviction, as Azure does it:

    emu.preempt(name)   # a Preempt scheduled event, NotBefore = now + 30 s
    ... the Agent checkpoints, uploads, then approves the event (StartRequests) ...
    # approval evicts at once: evictionPolicy Delete deletes the VM, its NIC and disk
    emu.reclaim(name)   # or NotBefore passed without an approval

The Agents' environment (`env`) stands in for the VM's managed identity: it points them at the
test's object-store emulator.

Where the emulated VM image is available (tests/fakes/vm_image.py), each VM is a container that
runs its custom data unmodified. Azurite accepts no bearer token over plain HTTP, so the VM's
"identity" in tests is Azurite's well-known account key (AZURE_STORAGE_CONNECTION_STRING in the
VM's environment, never in the custom data): the bootstrap signs with SharedKey where a real VM
takes a managed-identity token from IMDS. A VM whose OS powers off is deallocated; a deleted
(evicted) VM gets an ACPI-like shutdown of `shutdown_grace` seconds first.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from spotrun.clouds.base import Boot
from tests.fakes.azure_server import FakeARM
from tests.fakes.emulator import EmulatedInstance, InstanceEmulator, VMHooks


class AzureEmulator:
    def __init__(
        self,
        arm: FakeARM,
        root: Path,
        *,
        env: dict[str, str],
        notice_poll_interval: float = 0.2,
        interval: float = 0.05,
        shutdown_grace: float = 3.0,
        index_url: str | None = None,
    ) -> None:
        self.arm = arm
        self.notice_poll_interval = notice_poll_interval
        self.emulator = InstanceEmulator(
            list_instances=lambda: list(arm.running_boots()),
            boot_of=lambda name: arm.running_boots()[name],
            root=root,
            env=env,
            prepare=self._prepare,
            interval=interval,
            vm=VMHooks(
                arm.custom_data,
                lambda name, _: dict(env),
                shutdown_grace=shutdown_grace,
                index_url=index_url,
                powered_off=arm.guest_shutdown,
            ),
        )

    def _prepare(self, name: str, boot: Boot) -> tuple[Boot, None]:
        assert boot.notice.get("kind") == "azure", boot.notice
        return replace(boot, notice={**boot.notice, "poll_interval": self.notice_poll_interval}), None

    def start(self) -> AzureEmulator:
        self.emulator.start()
        return self

    def stop(self) -> None:
        self.emulator.stop()

    def __enter__(self) -> AzureEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def instance(self, name: str) -> EmulatedInstance:
        return self.emulator.instance(name)

    def preempt(self, name: str, *, reclaim_after: float | None = None) -> dict[str, Any]:
        return self.arm.preempt(name, reclaim_after=reclaim_after)

    def reclaim(self, name: str) -> None:
        self.arm.reclaim(name)

    def wait_for(self, predicate: Any, *, timeout: float, what: str) -> Any:
        return self.emulator.wait_for(predicate, timeout=timeout, what=what)

    def report(self) -> str:
        return self.emulator.report()
