"""One job across two fake clouds: real torch training (examples/train.py) preempted on GCP, its
checkpoint verified against its manifest, and finished on Azure with the same final weights, bit
for bit, as a run that was never interrupted.

The controller picks the cheapest offer (a GCP zone); after the preemption that zone cools down and
the next-best offer is on Azure. Each cloud keeps the job in its own store (the spec's `gcp.store`,
a GCS emulator; `azure.store`, Azurite): before the Azure VM starts, the controller moves the job's
files and its newest verified checkpoint from gs:// to az:// (spotrun.control.transfer). Both fakes, both
instance emulators and both storage emulators run at once; each VM's Agent reaches its own cloud's
store only, as the VMs' identities would allow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spotrun.catalog.model import Offer
from spotrun.checkpoint import verify_checkpoint
from spotrun.clouds.azure.provider import AzureProvider
from spotrun.clouds.gcp.provider import GCPProvider
from spotrun.clouds.store import Store, open_store
from spotrun.spec import load_spec
from tests.fakes.azure_emulator import AzureEmulator
from tests.fakes.azure_server import RESOURCE_GROUP, SUBSCRIPTION, FakeARM, StaticToken, arm_fixture, arm_server_fixture  # noqa: F401  (fixtures)
from tests.fakes.cloud_e2e import (
    ROOT,
    ControllerRun,
    Reference,
    assert_booted_on_the_image,
    exit_record,
    make_controller,
    output_digest,
    store_steps,
)
from tests.fakes.gce_server import PROJECT, FakeGCE, gce_credentials, gce_fixture, gce_server_fixture  # noqa: F401  (fixtures)
from tests.fakes.gcp_emulator import GCPEmulator
from tests.fakes.storage_emulators import (  # noqa: F401
    Azurite,
    GCSEmulator,
    azurite_fixture,
    azurite_server_fixture,
    gcs_emulator_fixture,
    gcs_emulator_server_fixture,
    make_azure_container,
    make_gcs_bucket,
    unique,
)

VM_IDENTITY = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/spotrun-runner"
)

pytestmark = pytest.mark.e2e

TRAIN = ["--steps", "40", "--every-steps", "10", "--samples", "1024", "--log-every", "10"]
# Slow steps in the first attempt only (time to preempt it mid-run); the weights do not depend on it.
SLOW = ["--step-sleep", '"$([ "$SPOTRUN_ATTEMPT" = 1 ] && echo 0.1 || echo 0)"']
# keep: 10 so that no checkpoint is pruned from a store: the one moved to az:// is still there to check.
SPEC = """
name: e2e-cross
resources:
  gpu: "T4:1"
  providers: [gcp, azure]
workdir: {workdir}
run: {run}
checkpoint: {{keep: 10}}
recovery: {{max_restarts: 0, zone_cooldown: 1h}}
gcp: {{store: "{gs}"}}
azure: {{store: "{az}"}}
"""


def fetch_checkpoint(store: Store, job: str, step: int, dest: Path) -> Path:
    """Download checkpoint `step` of `job` from `store` into `dest/<step>` (named as verify wants)."""
    copy = dest / f"{step:012d}"
    prefix = f"jobs/{job}/checkpoints/{step:012d}/"
    for key in store.list(prefix):
        store.get_file(key, copy / key[len(prefix) :])
    return copy


def test_preempted_on_gcp_finished_on_azure_bit_for_bit(
    tmp_path: Path, gce: FakeGCE, arm: FakeARM, gcs_emulator: GCSEmulator, azurite: Azurite
) -> None:
    pytest.importorskip("torch")
    bucket, container = unique("e2e-cross"), unique("e2e-cross")
    make_gcs_bucket(gcs_emulator, bucket)
    make_azure_container(azurite, container)
    store_url = f"gs://{bucket}/spotrun"  # the job's own store, and GCP's
    az_url = f"az://{container}/spotrun"  # Azure's
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(ROOT / "examples" / "train.py", workdir / "train.py")
    reference = Reference(workdir, TRAIN, script="train.py")
    run_line = "python train.py " + " ".join(TRAIN + SLOW)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(SPEC.format(workdir=workdir, run=json.dumps(run_line), gs=store_url, az=az_url))
    spec = load_spec(spec_path)
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
            identity=VM_IDENTITY,
        ),
    }
    offers = [
        Offer("gcp", "us-central1", "us-central1-a", "n1-standard-8", "T4", 1, 16.0, 8, 30, 0.10, 0.75, 0.05),
        Offer("azure", "eastus", "eastus-1", "Standard_NC4as_T4_v3", "T4", 1, 16.0, 4, 28, 0.16, 0.53, 0.05),
    ]
    controller = make_controller(tmp_path, providers=providers, offers=offers, store_url=store_url)
    job = controller.submit(spec)
    store, az_store = open_store(store_url), open_store(az_url)

    with (
        GCPEmulator(gce, tmp_path / "gce-vms", env=gcs_emulator.env()) as on_gcp,
        AzureEmulator(arm, tmp_path / "az-vms", env=azurite.env()) as on_azure,
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
        copy = fetch_checkpoint(store, job, saved, tmp_path / "fetched")
        assert verify_checkpoint(copy)
        on_gcp.reclaim(vm)
        result = run.join(90, report)

        attempts = controller.state.attempts(job)
        assert [(a.provider, a.end_reason) for a in attempts] == [("gcp", "preempted"), ("azure", "completed")]
        azure_log = on_azure.instance(attempts[1].instance_id).agent_log()
        assert f"resuming at step {saved}/" in azure_log, report()
        assert "does not match its manifest" not in azure_log
        assert_booted_on_the_image(on_gcp.emulator, attempts[0].instance_id)  # torch in the image's env, Agent on 3.9
        assert_booted_on_the_image(on_azure.emulator, attempts[1].instance_id)
        assert [a.store_url for a in attempts] == [None, az_url]  # None: the job's own store
        moves = [e for e in controller.state.events(job) if e.kind == "store_move"]
    assert record["reason"] == "preempted" and 0 < saved < 40
    assert (result.exit_code, result.preemptions) == (0, 1), result
    # The move: once, gs:// -> az://, carrying the checkpoint the GCP attempt saved on notice ...
    assert [(m.data["attempt"], m.data["step"]) for m in moves] == [(2, saved)], moves
    assert store_url in moves[0].message and az_url in moves[0].message
    # ... which is complete in az:// and matches its manifest: the very manifest bytes, every file re-hashed.
    moved = fetch_checkpoint(az_store, job, saved, tmp_path / "moved")
    assert verify_checkpoint(moved)
    manifest = f"jobs/{job}/checkpoints/{saved:012d}/MANIFEST.json"
    assert az_store.get_bytes(manifest) == store.get_bytes(manifest)
    # The Azure attempt wrote to its own store only: its exit and outputs are in az://, not gs://.
    assert exit_record(az_store, job, 2)["reason"] == "completed" and exit_record(store, job, 2) is None
    assert store.list(f"jobs/{job}/outputs/") == []
    assert output_digest(az_store, job) == reference.digest()  # the same weights, bit for bit, after changing clouds
    assert gce.instances == {} and arm.of_kind("vm") == []
