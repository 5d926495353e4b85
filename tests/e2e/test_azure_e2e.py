"""A whole job on the fake Azure Resource Manager: launch → Scheduled Events `Preempt` → checkpoint →
approval and eviction → relaunch in another zone → finish, bit for bit equal to an uninterrupted run.

Everything real except the cloud: the controller, AzureProvider through azure-mgmt-compute/-network
over HTTP, the Agent in its own process per VM (tests/fakes/azure_emulator.py), the Scheduled
Events watcher on the VM's metadata path, and the store on Azurite through azure-storage-blob.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spotrun.catalog.model import Offer
from spotrun.clouds.azure.provider import AzureProvider
from spotrun.clouds.store import open_store
from tests.fakes import vm_image
from tests.fakes.azure_emulator import AzureEmulator
from tests.fakes.azure_server import RESOURCE_GROUP, SUBSCRIPTION, FakeARM, StaticToken, arm_fixture, arm_server_fixture  # noqa: F401  (fixtures)
from tests.fakes.cloud_e2e import (
    BOOT_FAILURES,
    ControllerRun,
    Reference,
    assert_booted_on_the_image,
    assert_failed_booting,
    corrupt_agent_package,
    exit_record,
    make_controller,
    output_digest,
    store_steps,
    write_spec,
    write_tiny_workdir,
)
from tests.fakes.storage_emulators import Azurite, azurite_fixture, azurite_server_fixture, make_azure_container, unique  # noqa: F401  (fixtures)

VM_IDENTITY = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/spotrun-runner"
)

pytestmark = pytest.mark.e2e

ARGS = ["100", "10", "0.1"]  # steps, checkpoint every, seconds per step in attempt 1 (not in the digest)


def t4_offer(zone: str, price: float) -> Offer:
    return Offer("azure", "eastus", zone, "Standard_NC4as_T4_v3", "T4", 1, 16.0, 4, 28, price, 0.53, 0.05)


def azure_provider(arm: FakeARM) -> AzureProvider:
    return AzureProvider(
        SUBSCRIPTION,
        RESOURCE_GROUP,
        endpoint=arm.url,
        credential=StaticToken(),
        imds_endpoint=arm.metadata_endpoint,
        poll_interval=0.01,
        identity=VM_IDENTITY,  # in the emulator, Azurite's key in the VM's env stands in for it
    )


def test_azure_evicted_then_finished_in_another_zone_bit_for_bit(
    tmp_path: Path, arm: FakeARM, azurite: Azurite
) -> None:
    container = unique("e2e-azure")
    make_azure_container(azurite, container)
    store_url = f"az://{container}/spotrun"
    workdir = write_tiny_workdir(tmp_path / "work")
    reference = Reference(workdir, [*ARGS[:2], "0"])
    spec = write_spec(
        tmp_path / "job.yaml",
        name="e2e-azure",
        gpu="T4",
        providers=["azure"],
        workdir=workdir,
        run="python tiny_train.py " + " ".join(ARGS),
    )
    offers = [t4_offer("eastus-1", 0.16), t4_offer("eastus-2", 0.19)]
    controller = make_controller(tmp_path, providers={"azure": azure_provider(arm)}, offers=offers, store_url=store_url)
    job = controller.submit(spec)
    store = open_store(store_url)

    with AzureEmulator(arm, tmp_path / "vms", env=azurite.env()) as emu:
        run = ControllerRun(controller, job).start()
        first = run.until(
            lambda: next(iter(arm.running_boots()), None), timeout=30, what="the first VM", report=emu.report
        )
        assert arm.vm(first)["zones"] == ["1"]  # the cheaper zone first
        run.until(
            lambda: store_steps(store, job), timeout=30, what="a first checkpoint in the store", report=emu.report
        )
        event = emu.preempt(first)  # Preempt, NotBefore = now + 30 s
        record = run.until(
            lambda: exit_record(store, job, 1), timeout=30, what="attempt 1 to save and stop", report=emu.report
        )
        result = run.join(60, emu.report)

        assert record["reason"] == "preempted"
        saved = record["checkpoint_step"]
        assert 0 < saved < int(ARGS[0])
        # The Agent approves the event once its checkpoint is safe (Azure then evicts at once), and
        # the controller deletes the VM as soon as it reads the exit record: whichever comes first.
        assert arm.vm(first) is None
        assert arm.acknowledged in ([], [event["EventId"]])
        assert arm.evicted in ([], [first]) and bool(arm.evicted) == bool(arm.acknowledged)
        attempts = controller.state.attempts(job)
        assert [(a.provider, a.zone, a.end_reason) for a in attempts] == [
            ("azure", "eastus-1", "preempted"),
            ("azure", "eastus-2", "completed"),
        ]
        assert arm.vm(attempts[1].instance_id) is None or attempts[1].instance_id not in arm.running_boots()
        assert f"RESUMED_FROM={saved}" in emu.instance(attempts[1].instance_id).agent_log()
        for attempt in attempts:
            assert_booted_on_the_image(emu.emulator, attempt.instance_id)
    assert (result.exit_code, result.preemptions) == (0, 1), result
    assert output_digest(store, job) == reference.digest()  # bit for bit, as if never evicted
    assert [r["name"] for r in arm.of_kind("vm") + arm.of_kind("nic")] == []  # nothing left behind
    # the job ran as its own identity, which its end deleted with its role assignments
    assert len(arm.requests_to("PUT", r"/userAssignedIdentities/")) == 1
    assert arm.managed_identities == {} and arm.storage_assignments == {}


@pytest.mark.parametrize("failure", sorted(BOOT_FAILURES))
def test_azure_boot_failures_end_the_job_with_the_boot_log(
    tmp_path: Path, arm: FakeARM, azurite: Azurite, failure: str
) -> None:
    """Failing custom data: boot log in Blob storage, FAILED after max_boot_failures, nothing left."""
    if vm_image.unavailable():
        pytest.skip(f"needs the emulated VM image: {vm_image.unavailable()}")
    container = unique("e2e-azure-boot")
    make_azure_container(azurite, container)
    store_url = f"az://{container}/spotrun"
    workdir = write_tiny_workdir(tmp_path / "work")
    spec = write_spec(tmp_path / "job.yaml", name="e2e-azure-boot", gpu="T4", providers=["azure"], workdir=workdir,
                      run="python tiny_train.py 5 5 0", recovery="{max_restarts: 0, max_boot_failures: 2}")  # fmt: skip
    offers = [t4_offer("eastus-1", 0.16), t4_offer("eastus-2", 0.19)]
    controller = make_controller(tmp_path, providers={"azure": azure_provider(arm)}, offers=offers, store_url=store_url)
    job = controller.submit(spec)
    index = vm_image.UNREACHABLE_INDEX if failure == "index-unreachable" else None
    with AzureEmulator(arm, tmp_path / "vms", env=azurite.env(), index_url=index) as emu:
        if failure == "corrupt-package":
            emu.emulator.before_boot = corrupt_agent_package
        result = ControllerRun(controller, job).start().join(240, emu.report)
        assert_failed_booting(result, controller, job, failure, limit=2)
        assert open_store(store_url).exists(f"jobs/{job}/attempts/1/boot.log")
    assert [r["name"] for r in arm.of_kind("vm") + arm.of_kind("nic")] == []
    assert vm_image.leftover_vms() == []  # no VM container left behind
