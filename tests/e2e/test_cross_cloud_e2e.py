"""One job across two fake clouds: real torch training (examples/train.py) preempted on GCP, its
checkpoint verified against its manifest, and finished on Azure with the same final weights, bit
for bit, as a run that was never interrupted.

The controller picks the cheapest offer (a GCP zone); after the preemption that zone cools down and
the next-best offer is on Azure. Both fakes, both instance emulators and the store (a GCS emulator)
run at once; every VM's Agent can reach the store, as the VMs' identities would allow.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from spotrun.catalog.model import Offer
from spotrun.checkpoint import verify_checkpoint
from spotrun.providers.azure import AzureProvider
from spotrun.providers.gcp import GCPProvider
from spotrun.store import open_store
from tests.fakes.azure_emulator import AzureEmulator
from tests.fakes.azure_server import RESOURCE_GROUP, SUBSCRIPTION, FakeARM, StaticToken, arm_fixture, arm_server_fixture  # noqa: F401  (fixtures)
from tests.fakes.cloud_e2e import (
    ROOT,
    ControllerRun,
    Reference,
    exit_record,
    make_controller,
    output_digest,
    store_steps,
    write_spec,
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

TRAIN = ["--steps", "40", "--every-steps", "10", "--samples", "1024", "--log-every", "10"]
# Slow steps in the first attempt only (time to preempt it mid-run); the weights do not depend on it.
SLOW = ["--step-sleep", '"$([ "$SPOTRUN_ATTEMPT" = 1 ] && echo 0.1 || echo 0)"']


def test_preempted_on_gcp_finished_on_azure_bit_for_bit(
    tmp_path: Path, gce: FakeGCE, arm: FakeARM, gcs_emulator: GCSEmulator
) -> None:
    pytest.importorskip("torch")
    bucket = unique("e2e-cross")
    make_gcs_bucket(gcs_emulator, bucket)
    store_url = f"gs://{bucket}/spotrun"
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(ROOT / "examples" / "train.py", workdir / "train.py")
    reference = Reference(workdir, TRAIN, script="train.py")
    spec = write_spec(
        tmp_path / "job.yaml",
        name="e2e-cross",
        gpu="T4",
        providers=["gcp", "azure"],
        workdir=workdir,
        run=f"{sys.executable} train.py " + " ".join(TRAIN + SLOW),
    )
    providers = {
        "gcp": GCPProvider(
            PROJECT,
            endpoint=gce.url,
            credentials=gce_credentials(),
            imds_endpoint=gce.metadata_endpoint,
            service_account="runner@spotrun-test.iam",
        ),
        "azure": AzureProvider(
            SUBSCRIPTION,
            RESOURCE_GROUP,
            endpoint=arm.url,
            credential=StaticToken(),
            imds_endpoint=arm.metadata_endpoint,
            poll_interval=0.01,
        ),
    }
    offers = [
        Offer("gcp", "us-central1", "us-central1-a", "n1-standard-8", "T4", 1, 16.0, 8, 30, 0.10, 0.75, 0.05),
        Offer("azure", "eastus", "eastus-1", "Standard_NC4as_T4_v3", "T4", 1, 16.0, 4, 28, 0.16, 0.53, 0.05),
    ]
    controller = make_controller(tmp_path, providers=providers, offers=offers, store_url=store_url)
    job = controller.submit(spec)
    store = open_store(store_url)
    env = gcs_emulator.env()

    with (
        GCPEmulator(gce, tmp_path / "gce-vms", env=env) as on_gcp,
        AzureEmulator(arm, tmp_path / "az-vms", env=env) as on_azure,
    ):

        def report() -> str:
            return on_gcp.report() + "\n" + on_azure.report()

        run = ControllerRun(controller, job).start()
        vm = run.until(lambda: next(iter(gce.running_boots()), None), timeout=30, what="the GCP VM", report=report)
        run.until(lambda: store_steps(store, job), timeout=60, what="a first checkpoint from GCP", report=report)
        on_gcp.preempt(vm)
        record = run.until(
            lambda: exit_record(store, job, 1), timeout=40, what="the GCP attempt to stop", report=report
        )
        saved = record["checkpoint_step"]
        # The checkpoint that has to move: fetch it back from the store and check every file's hash.
        copy = tmp_path / "fetched" / f"{saved:012d}"
        prefix = f"jobs/{job}/checkpoints/{saved:012d}/"
        for key in store.list(prefix):
            store.get_file(key, copy / key[len(prefix) :])
        assert verify_checkpoint(copy)
        on_gcp.reclaim(vm)
        result = run.join(90, report)

        attempts = controller.state.attempts(job)
        assert [(a.provider, a.end_reason) for a in attempts] == [("gcp", "preempted"), ("azure", "completed")]
        azure_log = on_azure.instance(attempts[1].instance_id).agent_log()
        assert f"resuming at step {saved}/" in azure_log, report()
        assert "does not match its manifest" not in azure_log
    assert record["reason"] == "preempted" and 0 < saved < 40
    assert (result.exit_code, result.preemptions) == (0, 1), result
    assert output_digest(store, job) == reference.digest()  # the same weights, bit for bit, after changing clouds
    assert gce.instances == {} and arm.of_kind("vm") == []
