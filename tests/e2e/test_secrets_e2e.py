"""A `${VAR}` env value reaches the workload on each cloud's emulated VM through the cloud's secret
store, and nowhere else: not in any request the fake cloud received (other than the secret
store's own), the user-data, State, a log, a store object, a file, or a process's arguments; and
the secret is gone from the store once the job has ended.

The emulated VM's Agent inherits this test's environment, where the controller (as for local
instances) has put the value: the emulators are given the variables blanked, so the value the
workload sees can only have come from the secret store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spotrun.catalog.model import Offer
from spotrun.clouds.store import Store, open_store
from spotrun.spec import load_spec
from tests.fakes.azure_keyvault_fake import keyvault  # noqa: F401  (fixtures, as the names below)
from tests.fakes.cloud_e2e import ControllerRun, make_controller
from tests.fakes.gce_server import gce_fixture, gce_server_fixture  # noqa: F401
from tests.fakes.gcp_secret_fake import secret_manager  # noqa: F401
from tests.fakes.moto_server import aws, moto_server  # noqa: F401
from tests.fakes.storage_emulators import (  # noqa: F401
    azurite_fixture,
    azurite_server_fixture,
    gcs_emulator_fixture,
    gcs_emulator_server_fixture,
)

pytestmark = pytest.mark.e2e

SHOW = r'''
"""Proves the workload got the secret without ever printing it: its sha256, then a pause."""
import hashlib, os, sys, time
from pathlib import Path

digest = hashlib.sha256(os.environ.get("WANDB_API_KEY", "").encode()).hexdigest()
Path(os.environ["SPOTRUN_OUTPUT_DIR"], "secret.sha256").write_text(digest)
print("SECRET_SHA256=" + digest, flush=True)
time.sleep(float(sys.argv[1]))
'''

SPEC = """
name: secrets-e2e
resources: {{gpu: "{gpu}:1", providers: [{cloud}]}}
workdir: {workdir}
run: {run}
env: {{WANDB_API_KEY: "${{SPOTRUN_E2E_SECRET}}", PLAIN: visible}}
recovery: {{max_restarts: 0}}
"""
BLANKED = {"WANDB_API_KEY": "", "SPOTRUN_E2E_SECRET": ""}  # what the VM does not inherit


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[str]:
    """The value, in the launching shell; afterwards, no log record of this process holds it."""
    value = f"wandb-e2e-{secrets.token_hex(12)}"
    monkeypatch.setenv("SPOTRUN_E2E_SECRET", value)
    caplog.set_level(logging.INFO)
    yield value
    assert [r for r in caplog.records if value in r.getMessage()] == [], "the secret is in a log record"


def job_spec(tmp_path: Path, cloud: str, gpu: str) -> Any:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "show_secret.py").write_text(SHOW)
    run = json.dumps("python show_secret.py 1.5")  # the VM image provides `python` (its PyTorch env)
    (tmp_path / "job.yaml").write_text(SPEC.format(gpu=gpu, cloud=cloud, workdir=workdir, run=run))
    return load_spec(tmp_path / "job.yaml")


def process_arguments() -> Iterator[bytes]:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            yield cmdline.read_bytes()
        except OSError:
            continue


def run_and_check(
    tmp_path: Path,
    secret: str,
    *,
    controller: Any,
    spec: Any,
    store_url: str,
    emulator: Any,
    cloud_requests: Callable[[], list[bytes]],
) -> str:
    """Run the job to its end on `emulator`; check where the value went. Returns the job id."""
    needle = secret.encode()
    job = controller.submit(spec)
    store = open_store(store_url)
    with emulator as emu:
        run = ControllerRun(controller, job).start()
        run.until(
            lambda: any("SECRET_SHA256=" in i.agent_log() for i in emu.emulator.started.values()),
            timeout=60,
            what="the workload to start",
            report=emu.report,
        )
        leaks = [a for a in process_arguments() if needle in a]
        assert leaks == [], "the secret is in a process's arguments"
        result = run.join(60, emu.report)
        log = emu.report()
    assert result.exit_code == 0, (result, log)
    assert f"SECRET_SHA256={hashlib.sha256(needle).hexdigest()}" in log  # the workload had the value
    assert store.get_bytes(f"jobs/{job}/outputs/secret.sha256").decode() == hashlib.sha256(needle).hexdigest()
    assert secret not in log
    assert_nowhere(needle, store, tmp_path, cloud_requests())
    events = controller.state.events(job)
    assert any(e.kind == "secrets" and "deleted" in e.message for e in events), events
    return job


def assert_nowhere(needle: bytes, store: Store, tmp_path: Path, requests: list[bytes]) -> None:
    objects = [k for k in store.list("") if needle in store.get_bytes(k)]
    assert objects == [], f"the secret is in store objects {objects}"
    files = [p for p in tmp_path.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert files == [], f"the secret is in files {files} (State, logs, the VMs' disks)"
    assert requests, "no request to the fake cloud was recorded"
    assert [r for r in requests if needle in r] == [], "the secret went to the cloud outside its secret store"


# ---------------------------------------------------------------------- AWS


def test_aws_secret_reaches_the_workload_only(tmp_path: Path, secret: str, aws: Any) -> None:  # noqa: F811
    from spotrun.clouds.aws.provider import AWSProvider
    from spotrun.clouds.aws.secrets import AWSSecrets
    from tests.fakes.aws_emulator import AWSEmulator
    from tests.fakes.moto_server import fast_session

    region = "us-east-1"
    fast_session(region).client("s3").create_bucket(Bucket="spotrun-secrets")
    store_url = "s3://spotrun-secrets/spotrun"
    session = fast_session(region)
    sent: list[bytes] = []

    def record(request: Any, **_: Any) -> None:  # every request the controller's boto3 sends
        if not str(request.headers.get("X-Amz-Target", b"")).startswith(("secretsmanager.", "b'secretsmanager.")):
            sent.append(request.body if isinstance(request.body, bytes) else str(request.body or "").encode())

    session.events.register("before-send", record)
    provider = AWSProvider(region=region, session=session, regions=[region])
    offer = Offer("aws", region, "us-east-1a", "p3.2xlarge", "V100", 1, 16.0, 8, 61, 0.9, 3.06, 0.05)
    controller = make_controller(tmp_path, providers={"aws": provider}, offers=[offer], store_url=store_url)
    emulator = AWSEmulator(tmp_path / "instances", regions=[region], env={**aws.env(), **BLANKED})
    job = run_and_check(
        tmp_path,
        secret,
        controller=controller,
        spec=job_spec(tmp_path, "aws", "V100"),
        store_url=store_url,
        emulator=emulator,
        cloud_requests=lambda: sent,
    )
    assert any(b"RunInstances" in r for r in sent)  # user-data went through here, without the value
    assert AWSSecrets.from_provider(provider).find(job) is None  # deleted with the job


# ---------------------------------------------------------------------- GCP


def test_gcp_secret_reaches_the_workload_only(
    tmp_path: Path,
    secret: str,
    gce: Any,
    gcs_emulator: Any,
    secret_manager: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from spotrun.clouds.gcp.provider import GCPProvider
    from tests.fakes.gce_server import GOOD_TOKEN, PROJECT, gce_credentials
    from tests.fakes.gcp_emulator import GCPEmulator
    from tests.fakes.gcp_secret_fake import CONTROLLER, VM_SERVICE_ACCOUNT
    from tests.fakes.storage_emulators import make_gcs_bucket, unique

    bucket = unique("secrets-gcp")
    make_gcs_bucket(gcs_emulator, bucket)
    store_url = f"gs://{bucket}/spotrun"
    secret_manager.tokens[GOOD_TOKEN] = CONTROLLER  # the controller's one Google credential

    def vm_account() -> str:  # the metadata server's token is for the account the VM runs as
        return gce.requests_to("POST", r"/instances$")[-1].body["serviceAccounts"][0]["email"]

    secret_manager.vm_account = vm_account
    monkeypatch.setenv("SECRET_MANAGER_EMULATOR_HOST", secret_manager.url)
    provider = GCPProvider(
        PROJECT,
        endpoint=gce.url,
        credentials=gce_credentials(),
        imds_endpoint=gce.metadata_endpoint,
        service_account=VM_SERVICE_ACCOUNT,
    )
    offer = Offer("gcp", "us-central1", "us-central1-a", "n1-standard-8", "T4", 1, 16.0, 8, 30, 0.1, 0.75, 0.05)
    controller = make_controller(tmp_path, providers={"gcp": provider}, offers=[offer], store_url=store_url)
    env = {**gcs_emulator.env(), **secret_manager.env(), **BLANKED}
    run_and_check(
        tmp_path,
        secret,
        controller=controller,
        spec=job_spec(tmp_path, "gcp", "T4"),
        store_url=store_url,
        emulator=GCPEmulator(gce, tmp_path / "vms", env=env),
        cloud_requests=lambda: [json.dumps(r.body).encode() for r in gce.requests],
    )
    inserted = gce.requests_to("POST", r"/instances$")[0].body
    assert inserted["serviceAccounts"][0]["scopes"][-1] == "https://www.googleapis.com/auth/cloud-platform"
    assert inserted["serviceAccounts"][0]["email"] != VM_SERVICE_ACCOUNT  # the job's own account
    assert secret_manager.secrets == {}  # deleted with the job


# ---------------------------------------------------------------------- Azure


def test_azure_secret_reaches_the_workload_only(
    tmp_path: Path,
    secret: str,
    azurite: Any,
    keyvault: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from spotrun.clouds.azure.provider import AzureProvider
    from tests.fakes.azure_emulator import AzureEmulator
    from tests.fakes.azure_server import ARM_TOKEN, RESOURCE_GROUP, SUBSCRIPTION, FakeARM, StaticToken
    from tests.fakes.storage_emulators import make_azure_container, unique

    container = unique("secrets-azure")
    make_azure_container(azurite, container)
    store_url = f"az://{container}/spotrun"
    identity = (
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
        "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/spotrun-vm"
    )
    keyvault.add_identity(identity)
    keyvault.tokens[ARM_TOKEN] = "controller"  # the controller's one Azure credential
    for name, value in keyvault.controller_env().items():
        monkeypatch.setenv(name, value)
    arm = FakeARM().start()
    keyvault.attach_arm(arm)
    try:
        provider = AzureProvider(
            SUBSCRIPTION,
            RESOURCE_GROUP,
            endpoint=arm.url,
            credential=StaticToken(),
            imds_endpoint=arm.metadata_endpoint,
            identity=identity,
            poll_interval=0.01,
        )
        offer = Offer("azure", "eastus", "eastus-1", "Standard_NC4as_T4_v3", "T4", 1, 16.0, 4, 28, 0.16, 0.53, 0.05)
        controller = make_controller(tmp_path, providers={"azure": provider}, offers=[offer], store_url=store_url)
        env = {**azurite.env(), **keyvault.vm_env(), **keyvault.trust_env(), **BLANKED}
        run_and_check(
            tmp_path,
            secret,
            controller=controller,
            spec=job_spec(tmp_path, "azure", "T4"),
            store_url=store_url,
            emulator=AzureEmulator(arm, tmp_path / "vms", env=env),
            cloud_requests=lambda: [json.dumps(r.body).encode() for r in arm.requests],
        )
        vms = [r.body for r in arm.requests if r.method == "PUT" and "/virtualMachines/" in r.path]
        assert vms and all(identity not in vm["identity"]["userAssignedIdentities"] for vm in vms)  # the job's own
    finally:
        arm.stop()
    assert keyvault.secrets == {} and keyvault.deleted == {} and keyvault.assignments == {}  # purged, ungranted
    assert len(keyvault.arm_requests) >= 3  # identity lookup, grant, ungrant: through ARM
