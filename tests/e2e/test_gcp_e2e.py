"""A whole job on the fake Compute Engine: launch → preemption notice → checkpoint → preemption →
relaunch in another zone → finish, with the final weights equal bit for bit to an uninterrupted run.

Everything real except the cloud: the controller, GCPProvider through google-cloud-compute over
HTTP, the Agent in its own process per VM (tests/fakes/gcp_emulator.py), the notice watcher on the
VM's metadata path, and the store on a GCS emulator through google-cloud-storage.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spotrun.catalog.model import Offer
from spotrun.clouds.gcp.provider import GCPProvider
from spotrun.clouds.store import open_store
from tests.fakes import vm_image
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
from tests.fakes.gce_server import PROJECT, FakeGCE, gce_credentials, gce_fixture, gce_server_fixture  # noqa: F401  (fixtures)
from tests.fakes.gcp_emulator import GCPEmulator
from tests.fakes.storage_emulators import (  # noqa: F401
    GCSEmulator,
    gcs_emulator_fixture,
    gcs_emulator_server_fixture,
    make_gcs_bucket,
    unique,
)

pytestmark = pytest.mark.e2e

SA = "spotrun-runner@spotrun-test.iam.gserviceaccount.com"
ARGS = ["100", "10", "0.1"]  # steps, checkpoint every, seconds per step in attempt 1 (not in the digest)


def t4_offer(zone: str, price: float) -> Offer:
    return Offer("gcp", zone.rsplit("-", 1)[0], zone, "n1-standard-8", "T4", 1, 16.0, 8, 30, price, 0.75, 0.05)


def test_gcp_preempted_then_finished_in_another_zone_bit_for_bit(
    tmp_path: Path, gce: FakeGCE, gcs_emulator: GCSEmulator
) -> None:
    bucket = unique("e2e-gcp")
    make_gcs_bucket(gcs_emulator, bucket)
    store_url = f"gs://{bucket}/spotrun"
    workdir = write_tiny_workdir(tmp_path / "work")
    reference = Reference(workdir, [*ARGS[:2], "0"])
    spec = write_spec(
        tmp_path / "job.yaml",
        name="e2e-gcp",
        gpu="T4",
        providers=["gcp"],
        workdir=workdir,
        run="python tiny_train.py " + " ".join(ARGS),
    )
    provider = GCPProvider(
        PROJECT,
        endpoint=gce.url,
        credentials=gce_credentials(),
        imds_endpoint=gce.metadata_endpoint,
        service_account=SA,
    )
    offers = [t4_offer("us-central1-a", 0.10), t4_offer("us-central1-b", 0.13)]
    controller = make_controller(tmp_path, providers={"gcp": provider}, offers=offers, store_url=store_url)
    job = controller.submit(spec)
    store = open_store(store_url)

    with GCPEmulator(gce, tmp_path / "vms", env=gcs_emulator.env()) as emu:
        run = ControllerRun(controller, job).start()
        first = run.until(
            lambda: next(iter(gce.running_boots()), None), timeout=30, what="the first VM", report=emu.report
        )
        assert gce.instance(first)["zone"].endswith("/us-central1-a")  # the cheapest zone first
        run.until(
            lambda: store_steps(store, job), timeout=30, what="a first checkpoint in the store", report=emu.report
        )
        emu.preempt(first)  # metadata `preempted` -> TRUE: 30 s to go
        record = run.until(
            lambda: exit_record(store, job, 1), timeout=30, what="attempt 1 to save and stop", report=emu.report
        )
        emu.reclaim(first)  # the 30 s are over: the VM is deleted (if the controller has not already)
        result = run.join(60, emu.report)

        assert record["reason"] == "preempted"
        saved = record["checkpoint_step"]
        assert 0 < saved < int(ARGS[0])
        attempts = controller.state.attempts(job)
        assert [(a.provider, a.zone, a.end_reason) for a in attempts] == [
            ("gcp", "us-central1-a", "preempted"),
            ("gcp", "us-central1-b", "completed"),
        ]
        assert f"RESUMED_FROM={saved}" in emu.instance(attempts[1].instance_id).agent_log()
        for attempt in attempts:
            assert_booted_on_the_image(emu.emulator, attempt.instance_id)
    assert (result.exit_code, result.preemptions) == (0, 1), result
    assert output_digest(store, job) == reference.digest()  # bit for bit, as if never interrupted
    assert gce.instances == {}  # nothing left running (or billed)
    # the job ran as its own service account, which its end deleted with its bucket bindings
    assert len(gce.requests_to("POST", r"/serviceAccounts$")) == 1
    assert gce.account_records == {} and gce.bucket_policies[bucket]["bindings"] == []


@pytest.mark.parametrize("failure", [*sorted(BOOT_FAILURES), "no-identity"])
def test_gcp_boot_failures_end_the_job_with_the_boot_log(
    tmp_path: Path, gce: FakeGCE, gcs_emulator: GCSEmulator, failure: str
) -> None:
    """A failing startup script: boot log in GCS, FAILED after max_boot_failures, no VM left. A VM
    without a service account is refused before launch (exit 2)."""
    if vm_image.unavailable():
        pytest.skip(f"needs the emulated VM image: {vm_image.unavailable()}")
    bucket = unique("e2e-gcp-boot")
    make_gcs_bucket(gcs_emulator, bucket)
    store_url = f"gs://{bucket}/spotrun"
    workdir = write_tiny_workdir(tmp_path / "work")
    spec = write_spec(tmp_path / "job.yaml", name="e2e-gcp-boot", gpu="T4", providers=["gcp"], workdir=workdir,
                      run="python tiny_train.py 5 5 0", recovery="{max_restarts: 0, max_boot_failures: 2}")  # fmt: skip
    provider = GCPProvider(
        PROJECT,
        endpoint=gce.url,
        credentials=gce_credentials(),
        imds_endpoint=gce.metadata_endpoint,
        service_account=None if failure == "no-identity" else SA,
    )
    offers = [t4_offer("us-central1-a", 0.10), t4_offer("us-central1-b", 0.13)]
    controller = make_controller(tmp_path, providers={"gcp": provider}, offers=offers, store_url=store_url)
    job = controller.submit(spec)
    index = vm_image.UNREACHABLE_INDEX if failure == "index-unreachable" else None
    with GCPEmulator(gce, tmp_path / "vms", env=gcs_emulator.env(), index_url=index) as emu:
        if failure == "corrupt-package":
            emu.emulator.before_boot = corrupt_agent_package
        result = ControllerRun(controller, job).start().join(240, emu.report)
        if failure == "no-identity":  # refused before any VM: it could not have read the store (#12)
            assert (result.status.value, result.exit_code) == ("FAILED", 2), result
            assert "gcp.service_account" in result.reason and "gcloud iam service-accounts create" in result.reason
            assert gce.requests_to("POST", r"/instances$") == []
        else:
            assert_failed_booting(result, controller, job, failure, limit=2)
            assert open_store(store_url).exists(f"jobs/{job}/attempts/2/boot.log")
    assert gce.instances == {}
    assert vm_image.leftover_vms() == []  # no VM container left behind
