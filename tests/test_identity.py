"""The VMs' identity (issue #12, item 3): required on GCP and Azure, and scoped to the job.

* `spotrun check JOB.yaml -p gcp|azure` without the VMs' identity names exactly what is missing
  and exits 2; with it, exit 0 (the real CLI, the real provider, pointed at the GCE / ARM fakes).
* `launch` refuses before it creates anything.
* One job's VM identity cannot overwrite another job's checkpoint nor a shared `agent/` object,
  and can read `agent/`: on AWS by the instance-profile policy spotrun creates, on GCP and Azure
  by the per-job bindings / role assignments `identity.py` writes. The storage fakes
  (fake-gcs-server, Azurite, moto) do not enforce IAM, so each policy is evaluated here.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from spotrun.catalog.model import Offer
from spotrun.cli.app import app
from spotrun.clouds.aws.resources import store_policy
from spotrun.clouds.azure import identity as azure_identity
from spotrun.clouds.azure.provider import AzureProvider
from spotrun.clouds.base import AuthError, Boot
from spotrun.clouds.gcp import identity as gcp_identity
from spotrun.clouds.gcp.provider import GCPProvider
from tests.fakes.azure_server import (  # noqa: F401  (fixtures)
    RESOURCE_GROUP,
    SUBSCRIPTION,
    FakeARM,
    StaticToken,
    arm_fixture,
    arm_server_fixture,
)
from tests.fakes.gce_server import PROJECT, FakeGCE, gce_credentials, gce_fixture, gce_server_fixture  # noqa: F401

SA = "spotrun-runner@spotrun-test.iam.gserviceaccount.com"
IDENTITY = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/spotrun-runner"
)


def spec(tmp_path: Path, cloud: str, section: dict[str, str]) -> Path:
    lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in section.items())
    store = {"gcp": "gs://bucket/spotrun", "azure": "az://spotrun/runs"}[cloud]
    path = tmp_path / "job.yaml"
    path.write_text(
        f"name: ident\nresources:\n  gpu: T4:1\n  providers: [{cloud}]\nrun: python train.py\n"
        f"store: {store}\n{cloud}:\n{lines}\n"
    )
    return path


@pytest.fixture
def at_fakes(monkeypatch: pytest.MonkeyPatch, gce: FakeGCE, arm: FakeARM) -> None:
    """The CLI's providers talk to the fakes (as AWS_ENDPOINT_URL points boto3 at moto)."""
    monkeypatch.setattr(
        GCPProvider,
        "__init__",
        functools.partialmethod(GCPProvider.__init__, endpoint=gce.url, credentials=gce_credentials()),
    )
    monkeypatch.setattr(
        AzureProvider,
        "__init__",
        functools.partialmethod(AzureProvider.__init__, endpoint=arm.url, credential=StaticToken()),
    )


CASES = [
    ("gcp", {"project": PROJECT}, {"service_account": SA}, "gcp.service_account"),
    ("azure", {"subscription_id": SUBSCRIPTION, "resource_group": RESOURCE_GROUP}, {"identity": IDENTITY},
     "azure.identity"),
]  # fmt: skip


@pytest.mark.parametrize("cloud,base,ident,what", CASES, ids=[c[0] for c in CASES])
def test_check_names_the_missing_identity_and_exits_2(
    tmp_path: Path, at_fakes: None, cloud: str, base: dict[str, str], ident: dict[str, str], what: str
) -> None:
    without = CliRunner().invoke(app, ["check", str(spec(tmp_path, cloud, base)), "-p", cloud])
    assert without.exit_code == 2, without.output
    assert f"{cloud}: missing {what}" in " ".join(without.output.split())
    as_json = CliRunner().invoke(app, ["check", str(spec(tmp_path, cloud, base)), "-p", cloud, "--json"])
    (row,) = json.loads(as_json.output)["providers"]
    assert (as_json.exit_code, row["usable"], len(row["missing"])) == (2, False, 1)
    assert row["missing"][0].startswith(what)
    with_identity = CliRunner().invoke(app, ["check", str(spec(tmp_path, cloud, {**base, **ident})), "-p", cloud])
    assert with_identity.exit_code == 0, with_identity.output
    assert "missing" not in with_identity.output


@pytest.mark.parametrize(
    "cloud,value,why",
    [
        ("gcp", "123-compute@developer.gserviceaccount.com", "default compute service account"),
        ("gcp", "not-an-email", "not a service account email"),
        ("azure", "spotrun-runner", "not a user-assigned identity"),
    ],
)
def test_unusable_identities_are_named(cloud: str, value: str, why: str) -> None:
    problems = gcp_identity.missing(value) if cloud == "gcp" else azure_identity.missing(value)
    assert len(problems) == 1 and why in problems[0]


def test_check_names_a_gcp_service_account_that_does_not_exist(gce: FakeGCE) -> None:
    ghost = "spotrun-ghost@spotrun-test.iam.gserviceaccount.com"
    report = GCPProvider(PROJECT, endpoint=gce.url, credentials=gce_credentials(), service_account=ghost).check()
    assert report["usable"] is False and report["missing"] == [
        f"gcp.service_account {ghost} does not exist: create it (gcloud iam service-accounts create spotrun-ghost) "
        "(docs/providers/gcp.md#permissions)"
    ]


def test_check_names_an_azure_identity_that_does_not_exist(arm: FakeARM) -> None:
    ghost = IDENTITY.replace("spotrun-runner", "spotrun-ghost")
    report = AzureProvider(
        SUBSCRIPTION, RESOURCE_GROUP, endpoint=arm.url, credential=StaticToken(), identity=ghost
    ).check()
    assert report["usable"] is False and report["missing"] == [
        f"azure.identity {ghost} does not exist: create it (az identity create -n spotrun-ghost) "
        "(docs/providers/azure.md#permissions)"
    ]
    assert arm.requests_to("GET", r"/userAssignedIdentities/spotrun-ghost$")


def test_launch_refuses_without_identity_and_creates_nothing(gce: FakeGCE, arm: FakeARM) -> None:
    boot = Boot(job_id="j", attempt=1, store_url="gs://b/p", job_prefix="jobs/j")
    gcp = GCPProvider(PROJECT, endpoint=gce.url, credentials=gce_credentials())
    offer = Offer("gcp", "us-central1", "us-central1-a", "n1-standard-8", "T4", 1, 16.0, 8, 30, 0.2, 0.6, 0.1)
    with pytest.raises(AuthError, match="gcp.service_account") as refused:
        gcp.launch(offer, spot=True, boot=boot, client_token="t")
    assert refused.value.code == "identity" and gce.requests == []
    azure = AzureProvider(SUBSCRIPTION, RESOURCE_GROUP, endpoint=arm.url, credential=StaticToken())
    offer = Offer("azure", "eastus", "", "Standard_NC4as_T4_v3", "T4", 1, 16.0, 4, 28, 0.2, 0.5, 0.05)
    with pytest.raises(AuthError, match="azure.identity"):
        azure.launch(offer, spot=True, boot=boot, client_token="t")
    assert arm.requests == []


# ---------------------------------------------------------------------- per-job scoping


def s3_allows(policy: dict[str, Any], action: str, key_arn: str) -> bool:
    """IAM's answer for an identity-based policy with Allow statements only (no Deny, no
    conditions on object actions): is `action` on `key_arn` allowed?"""
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if st["Effect"] == "Allow" and action in actions and any(fnmatch.fnmatchcase(key_arn, r) for r in resources):
            return True
    return False


def test_aws_job_profile_cannot_overwrite_another_job_or_agent() -> None:
    a = store_policy("s3://bucket/team", "jobs/job-a")
    b = store_policy("s3://bucket/team", "jobs/job-b")
    ckpt_a = "arn:aws:s3:::bucket/team/jobs/job-a/checkpoints/step-100/manifest.json"
    agent = "arn:aws:s3:::bucket/team/agent/spotrun-0.1-abc.tar.gz"
    assert s3_allows(a, "s3:PutObject", ckpt_a)  # its own checkpoint
    assert not s3_allows(b, "s3:PutObject", ckpt_a)  # another job's checkpoint
    assert not s3_allows(b, "s3:DeleteObject", ckpt_a)
    assert not s3_allows(b, "s3:PutObject", agent)  # a shared object
    assert s3_allows(b, "s3:GetObject", agent)  # ... which it may read
    assert s3_allows(b, "s3:GetObject", "arn:aws:s3:::bucket/team/data/" + "0" * 64 + ".tar.gz")
    assert not s3_allows(b, "s3:PutObject", "arn:aws:s3:::bucket/team/jobs/job-b2/x")  # a prefix of its name


def test_gcp_job_account_cannot_overwrite_another_job_or_agent() -> None:
    sa_a = gcp_identity.job_service_account("job-a", PROJECT)
    sa_b = gcp_identity.job_service_account("job-b", PROJECT)
    assert sa_a != sa_b
    policy = [*gcp_identity.job_bindings("gs://bucket/team", "job-a", sa_a),
              *gcp_identity.job_bindings("gs://bucket/team", "job-b", sa_b)]  # fmt: skip
    ckpt_a, agent = "team/jobs/job-a/checkpoints/step-100/manifest.json", "team/agent/spotrun-0.1-abc.tar.gz"
    assert gcp_identity.allowed(policy, sa_a, "storage.objects.create", ckpt_a)
    assert not gcp_identity.allowed(policy, sa_b, "storage.objects.create", ckpt_a)
    assert not gcp_identity.allowed(policy, sa_b, "storage.objects.delete", ckpt_a)
    assert not gcp_identity.allowed(policy, sa_b, "storage.objects.create", agent)
    assert not gcp_identity.allowed(policy, sa_b, "storage.objects.update", agent)
    assert gcp_identity.allowed(policy, sa_b, "storage.objects.get", agent)
    assert not gcp_identity.allowed(policy, sa_b, "storage.objects.create", "team/jobs/job-b2/x")
    condition = policy[0].condition("bucket")["expression"]
    assert condition == 'resource.name.startsWith("projects/_/buckets/bucket/objects/team/jobs/job-a/")'


def test_azure_job_identity_cannot_overwrite_another_job_or_agent() -> None:
    a = azure_identity.job_assignments("az://spotrun/runs", "job-a", "principal-a")
    b = azure_identity.job_assignments("az://spotrun/runs", "job-b", "principal-b")
    policy = [*a, *b]
    ckpt_a, agent = "runs/jobs/job-a/checkpoints/step-100/manifest.json", "runs/agent/spotrun-0.1-abc.tar.gz"
    write, read, delete = azure_identity.WRITE, azure_identity.READ, azure_identity.DELETE
    assert azure_identity.allowed(policy, "principal-a", write, ckpt_a)
    assert not azure_identity.allowed(policy, "principal-b", write, ckpt_a)
    assert not azure_identity.allowed(policy, "principal-b", delete, ckpt_a)
    assert not azure_identity.allowed(policy, "principal-b", write, agent)
    assert azure_identity.allowed(policy, "principal-b", read, agent)
    assert "StringStartsWith 'runs/jobs/job-a/'" in a[0].condition()


def test_the_controller_host_runs_as_the_configured_identity_not_a_store_scoped_one() -> None:
    """A per-job identity is scoped to the store: the controller host (`controller: cloud`) must
    launch and delete instances, so it runs as the configured gcp.service_account / azure.identity."""
    from spotrun.clouds.azure import identity as azure_identity
    from spotrun.clouds.base import Boot
    from spotrun.clouds.gcp import identity as gcp_identity

    for store, uses in (("gs://b/p", gcp_identity.uses_job_account), ("az://c/p", azure_identity.uses_job_identity)):
        job = Boot(job_id="j-1", attempt=1, store_url=store, job_prefix="jobs/j-1")
        host = Boot(job_id="spotrun-controller", attempt=1, store_url=store, job_prefix="jobs/x", role="controller")
        assert uses(job) and not uses(host)
