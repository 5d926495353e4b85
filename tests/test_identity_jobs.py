"""Per-job identities (issue #12, item 3): each job's VMs run as their own GCP service account /
Azure managed identity, bound only to the job's prefix (read-only on `agent/` and `data/`).

The policies are read back from the fakes (the bucket's IAM policy, the role assignments ARM
stored) and evaluated with `allowed`: job B's identity cannot write job A's checkpoint nor an
`agent/` object, and can read `agent/`. After the jobs end, identities and bindings are gone."""

from __future__ import annotations

import pytest

from spotrun.catalog.model import Offer
from spotrun.clock import FakeClock
from spotrun.clouds.azure import identity as az
from spotrun.clouds.azure.provider import AzureProvider
from spotrun.clouds.base import Boot
from spotrun.clouds.gcp import identity as gi
from spotrun.clouds.gcp.provider import GCPProvider
from tests.fakes import azure_identity_fake, gcp_iam_fake
from tests.fakes.azure_keyvault_fake import FakeKeyVault, keyvault  # noqa: F401  (fixture)
from tests.fakes.azure_server import (  # noqa: F401  (fixtures)
    RESOURCE_GROUP,
    SUBSCRIPTION,
    FakeARM,
    StaticToken,
    arm_fixture,
    arm_server_fixture,
)
from tests.fakes.gce_server import PROJECT, FakeGCE, gce_credentials, gce_fixture, gce_server_fixture  # noqa: F401
from tests.fakes.gcp_secret_fake import FakeSecretManager, secret_manager  # noqa: F401  (fixture)

SA = "spotrun-runner@spotrun-test.iam.gserviceaccount.com"
IDENTITY = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/spotrun-runner"
)
GCS = "gs://bucket/spotrun"
AZ = "az://runs@acct/spotrun"
GCP_OFFER = Offer("gcp", "us-central1", "us-central1-a", "n1-standard-8", "T4", 1, 16.0, 8, 30, 0.2, 0.6, 0.1)
AZ_OFFER = Offer("azure", "eastus", "", "Standard_NC4as_T4_v3", "T4", 1, 16.0, 4, 28, 0.2, 0.5, 0.05)


def boot(job: str, store: str) -> Boot:
    return Boot(job_id=job, attempt=1, store_url=store, job_prefix=f"jobs/{job}")


# ---------------------------------------------------------------------- GCP


def gcp(gce: FakeGCE) -> GCPProvider:
    return GCPProvider(PROJECT, endpoint=gce.url, credentials=gce_credentials(), service_account=SA,
                       imds_endpoint=gce.metadata_endpoint, clock=FakeClock())  # fmt: skip


def applied_bindings(gce: FakeGCE, bucket: str) -> list[gi.Binding]:
    """The bucket policy as the fake holds it, turned back into bindings (prefixes parsed from
    each condition's expression; an unconditioned binding covers the whole bucket)."""
    out = []
    for b in gce.bucket_policies.get(bucket, {}).get("bindings", []):
        cond = b.get("condition")
        prefixes = gcp_iam_fake.condition_prefixes(bucket, cond["expression"]) if cond else [""]
        assert prefixes is not None
        out += [gi.Binding(b["role"], m, tuple(prefixes)) for m in b["members"]]
    return out


def test_gcp_jobs_get_their_own_account_scoped_to_their_prefix(gce: FakeGCE) -> None:
    provider = gcp(gce)
    a = provider.launch(GCP_OFFER, spot=True, boot=boot("job-a", GCS), client_token="a")
    b = provider.launch(GCP_OFFER, spot=True, boot=boot("job-b", GCS), client_token="b")
    provider.launch(GCP_OFFER, spot=True, boot=boot("job-b", GCS), client_token="b2")  # idempotent per job
    sa_a, sa_b = (gce.instance(i.instance_id)["serviceAccounts"][0]["email"] for i in (a, b))
    assert sa_a != sa_b and SA not in (sa_a, sa_b)
    assert set(gce.account_records) == {sa_a, sa_b}
    policy = applied_bindings(gce, "bucket")
    mb = f"serviceAccount:{sa_b}"
    write, read = "storage.objects.create", "storage.objects.get"
    assert not gi.allowed(policy, mb, write, "spotrun/jobs/job-a/ckpt/step-10/manifest.json")
    assert not gi.allowed(policy, mb, write, "spotrun/agent/spotrun.whl")
    assert gi.allowed(policy, mb, read, "spotrun/agent/spotrun.whl")
    assert gi.allowed(policy, mb, write, "spotrun/jobs/job-b/ckpt/step-10/manifest.json")
    assert gi.allowed(policy, f"serviceAccount:{sa_a}", write, "spotrun/jobs/job-a/ckpt/x")
    assert len(gce.requests_to("PUT", r"/storage/v1/b/bucket/iam$")) == 2  # once per job, not per launch

    for inst in (a, b):
        provider.terminate(inst)
    provider.release_job("job-a")
    assert {m for bd in applied_bindings(gce, "bucket") for m in [bd.member]} == {mb}
    gcp(gce).release_job("job-b")  # a fresh provider (a restarted controller) finds it by name
    gcp(gce).release_job("job-b")  # idempotent
    assert gce.account_records == {} and gce.bucket_policies["bucket"]["bindings"] == []


def test_gcp_bucket_policy_write_retries_a_stale_etag_and_keeps_others(gce: FakeGCE) -> None:
    provider = gcp(gce)
    other = {"role": "roles/storage.objectViewer", "members": ["user:someone@example.com"]}
    gce.bucket_policies["bucket"] = {"bindings": [other], "etag": "old", "version": 1}
    stale = {"done": False}
    real_put = next(h for m, rx, h in gce._routes if m == "PUT" and rx.pattern.startswith("/storage"))

    def racing_put(req):  # another writer changes the policy between our read and our write
        if not stale["done"]:
            stale["done"] = True
            gce.bucket_policies["bucket"] = {**gce.bucket_policies["bucket"], "etag": "changed"}
        return real_put(req)

    gce._routes = [(m, rx, racing_put if h is real_put else h) for m, rx, h in gce._routes]
    try:
        provider.launch(GCP_OFFER, spot=True, boot=boot("job-a", GCS), client_token="a")
    finally:
        gce._routes = [(m, rx, real_put if h is racing_put else h) for m, rx, h in gce._routes]
    puts = gce.requests_to("PUT", r"/storage/v1/b/bucket/iam$")
    assert len(puts) == 2  # the first was refused (412), the second read again and won
    assert other in gce.bucket_policies["bucket"]["bindings"]


@pytest.mark.parametrize(
    "body,why",
    [
        ({"bindings": [{"role": "roles/storage.objectUser", "members": ["serviceAccount:nobody@x.iam"]}]},
         "does not exist"),
        ({"version": 1, "bindings": [{"role": "roles/storage.objectUser", "members": [f"serviceAccount:{SA}"],
                                      "condition": {"title": "t", "expression": 'resource.name.startsWith("projects/_/buckets/bucket/objects/x")'}}]},  # noqa: E501
         "version 3"),
        ({"version": 3, "bindings": [{"role": "roles/storage.objectUser", "members": [f"serviceAccount:{SA}"],
                                      "condition": {"title": "t", "expression": "true"}}]},
         "invalid"),
        ({"etag": "stale", "bindings": []}, "Precondition"),
    ],
)  # fmt: skip
def test_gcs_iam_fake_refuses_what_cloud_storage_refuses(gce: FakeGCE, body: dict, why: str) -> None:
    import requests

    r = requests.put(f"{gce.url}/storage/v1/b/bucket/iam", json=body,
                     headers={"Authorization": f"Bearer {gce.token}"}, timeout=10)  # fmt: skip
    assert r.status_code in (400, 412) and why in r.json()["error"]["message"]
    if why == "Precondition":
        assert r.status_code == 412


def test_gcp_leftover_accounts_are_found_by_the_sweep(gce: FakeGCE) -> None:
    provider = gcp(gce)
    provider.launch(GCP_OFFER, spot=True, boot=boot("crashed-job", GCS), client_token="c")
    found = gi.leftover_accounts(gcp(gce))
    assert found == {"crashed-job": gi.job_service_account("crashed-job", PROJECT)}


# ---------------------------------------------------------------------- Azure


def azure(arm: FakeARM) -> AzureProvider:
    return AzureProvider(SUBSCRIPTION, RESOURCE_GROUP, endpoint=arm.url, credential=StaticToken(),
                         poll_interval=0.01, identity=IDENTITY, imds_endpoint=arm.metadata_endpoint)  # fmt: skip


def applied_assignments(arm: FakeARM) -> list[az.Assignment]:
    roles = {v: k for k, v in az.ROLE_IDS.items()}
    out = []
    for a in arm.storage_assignments.values():
        p = a["properties"]
        role = roles[p["roleDefinitionId"].rsplit("/", 1)[-1]]
        prefixes = azure_identity_fake.condition_prefixes(p["condition"]) if p.get("condition") else [""]
        out.append(az.Assignment(role, p["principalId"], tuple(prefixes)))
    return out


def test_azure_jobs_get_their_own_identity_scoped_to_their_prefix(arm: FakeARM) -> None:
    provider = azure(arm)
    a = provider.launch(AZ_OFFER, spot=True, boot=boot("job-a", AZ), client_token="a")
    b = provider.launch(AZ_OFFER, spot=True, boot=boot("job-b", AZ), client_token="b")
    ids = [next(iter(arm.vm(i.instance_id)["identity"]["userAssignedIdentities"])) for i in (a, b)]
    assert ids[0] != ids[1] and IDENTITY not in ids
    principal_b = arm.managed_identities[ids[1].lower()]["properties"]["principalId"]
    scopes = {x["properties"]["scope"] for x in arm.storage_assignments.values()}
    assert scopes == {f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Storage/"
                      "storageAccounts/acct/blobServices/default/containers/runs"}  # fmt: skip
    policy = applied_assignments(arm)
    assert len(policy) == 4
    assert not az.allowed(policy, principal_b, az.WRITE, "spotrun/jobs/job-a/ckpt/step-10/manifest.json")
    assert not az.allowed(policy, principal_b, az.DELETE, "spotrun/jobs/job-a/ckpt/step-10/manifest.json")
    assert not az.allowed(policy, principal_b, az.WRITE, "spotrun/agent/spotrun.whl")
    assert az.allowed(policy, principal_b, az.READ, "spotrun/agent/spotrun.whl")
    assert az.allowed(policy, principal_b, az.WRITE, "spotrun/jobs/job-b/ckpt/x")

    for inst in (a, b):
        provider.terminate(inst)
    provider.release_job("job-a")
    assert {x.principal for x in applied_assignments(arm)} == {principal_b}
    azure(arm).release_job("job-b")
    azure(arm).release_job("job-b")
    assert arm.managed_identities == {} and arm.storage_assignments == {}


def test_azure_leftover_identities_are_found_by_the_sweep(arm: FakeARM) -> None:
    azure(arm).launch(AZ_OFFER, spot=True, boot=boot("crashed-job", AZ), client_token="c")
    found = az.leftover_identities(azure(arm))
    assert list(found) == ["crashed-job"] and found["crashed-job"].endswith(az.job_identity_name("crashed-job"))


def _put_assignment(arm: FakeARM, principal: str, condition: str) -> tuple[int, str]:
    import uuid

    import requests

    scope = (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Storage/"
             "storageAccounts/acct/blobServices/default/containers/runs")  # fmt: skip
    body = {"properties": {"roleDefinitionId": f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Authorization/"
                                               f"roleDefinitions/{az.ROLE_IDS['Storage Blob Data Reader']}",
                           "principalId": principal, "condition": condition, "conditionVersion": "2.0"}}  # fmt: skip
    url = f"{arm.url}{scope}/providers/Microsoft.Authorization/roleAssignments/{uuid.uuid4()}?api-version=2022-04-01"
    r = requests.put(url, json=body, headers={"Authorization": f"Bearer {arm.token}"}, timeout=10)
    return r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else ""


def test_arm_fake_refuses_unknown_principals_and_malformed_conditions(arm: FakeARM) -> None:
    good = az.Assignment("Storage Blob Data Reader", "x", ("agent/",)).condition()
    assert _put_assignment(arm, "00000000-0000-0000-0000-00000000dead", good) == (400, "PrincipalNotFound")
    principal = azure_identity_fake.principal_of(IDENTITY)
    assert _put_assignment(arm, principal, good[:-1]) == (400, "InvalidConditionExpression")
    assert _put_assignment(arm, principal, "rm -rf /") == (400, "InvalidConditionExpression")
    assert _put_assignment(arm, principal, good) == (201, "")


# ---------------------------------------------------------------------- a crashed controller


def test_gc_releases_what_a_crashed_controller_left(
    monkeypatch: pytest.MonkeyPatch, tmp_path, gce: FakeGCE, arm: FakeARM
) -> None:
    """A job whose controller died before its ending path: `spotrun gc` deletes its identities."""
    import functools
    import json
    import time

    from typer.testing import CliRunner

    from spotrun.cli.app import app
    from spotrun.control.state import JobStatus, State

    monkeypatch.setenv("SPOTRUN_HOME", str(tmp_path))
    monkeypatch.setattr(GCPProvider, "__init__", functools.partialmethod(
        GCPProvider.__init__, endpoint=gce.url, credentials=gce_credentials()))  # fmt: skip
    monkeypatch.setattr(AzureProvider, "__init__", functools.partialmethod(
        AzureProvider.__init__, endpoint=arm.url, credential=StaticToken()))  # fmt: skip
    gcp(gce).launch(GCP_OFFER, spot=True, boot=boot("lost-1", GCS), client_token="l")
    azure(arm).launch(AZ_OFFER, spot=True, boot=boot("lost-1", AZ), client_token="l")
    assert gi.leftover_accounts(gcp(gce)) and az.leftover_identities(azure(arm))
    spec = {
        "name": "lost",
        "run": "python t.py",
        "store": GCS,
        "resources": {"gpu": "T4:1", "providers": ["gcp", "azure"]},
        "gcp": {"project": PROJECT, "service_account": SA},
        "azure": {"subscription_id": SUBSCRIPTION, "resource_group": RESOURCE_GROUP, "identity": IDENTITY},
    }
    state = State.open_default()
    state.create_job("lost-1", "lost", spec, (tmp_path / "store").as_uri(), time.time(), None)
    for cloud, offer in (("gcp", GCP_OFFER), ("azure", AZ_OFFER)):
        state.begin_attempt("lost-1", provider=cloud, region=offer.region, zone=offer.zone,
                            instance_type=offer.instance_type, spot=True, offer_key=offer.key, hourly_price=0.2,
                            ondemand_price=0.6, time_scale=1.0, now=time.time())  # fmt: skip
    state.set_job_status("lost-1", JobStatus.FAILED, time.time(), exit_code=1)
    out = CliRunner().invoke(app, ["gc", "--older-than", "0s", "--keep-files", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["removed"] == [{"job_id": "lost-1", "files_deleted": False}]
    assert gi.leftover_accounts(gcp(gce)) == {} and gce.bucket_policies["bucket"]["bindings"] == []
    assert az.leftover_identities(azure(arm)) == {} and arm.storage_assignments == {}


# ---------------------------------------------------------------------- the fallback


def test_a_gcp_secrets_job_runs_as_its_own_account_which_alone_reads_its_secret(
    gce: FakeGCE,
    secret_manager: FakeSecretManager,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The secret store makes the job's account before granting it (so the grant is not the
    shared account's), and the launch runs the VM as that same account."""
    import dataclasses

    from spotrun.clouds.gcp.secrets import GCPSecrets
    from spotrun.clouds.secrets import SECRETS_REF_ENV, SecretsError, encode_ref
    from tests.fakes.gcp_secret_fake import CONTROLLER, VM_TOKEN

    for k, v in secret_manager.env().items():
        monkeypatch.setenv(k, v)
    secret_manager.tokens[gce_credentials().token] = CONTROLLER  # the controller's one credential
    provider = gcp(gce)
    refs = {}
    for job in ("sec-1", "sec-2"):
        refs[job] = GCPSecrets.from_provider(provider).put(job, {"HF_TOKEN": f"v-{job}"}, store_url=GCS)
    sec = dataclasses.replace(boot("sec-1", GCS), env={SECRETS_REF_ENV: encode_ref(refs["sec-1"])})
    inst = provider.launch(GCP_OFFER, spot=True, boot=sec, client_token="s")
    vm_account = gce.instance(inst.instance_id)["serviceAccounts"][0]["email"]
    assert vm_account == gi.job_service_account("sec-1", PROJECT) != SA

    def read_as(account: str, job: str) -> dict[str, str]:
        secret_manager.tokens[VM_TOKEN] = f"serviceAccount:{account}"  # the VM's metadata token
        return GCPSecrets.fetch(refs[job], tries=1)

    assert read_as(vm_account, "sec-1") == {"HF_TOKEN": "v-sec-1"}
    for account, job in ((SA, "sec-1"), (vm_account, "sec-2"), (gi.job_service_account("sec-2", PROJECT), "sec-1")):
        with pytest.raises(SecretsError, match="HTTP 403"):  # the shared account, the other job's
            read_as(account, job)
    # and it writes only its own prefix, as any job's account
    policy = applied_bindings(gce, "bucket")
    assert gi.allowed(policy, f"serviceAccount:{vm_account}", "storage.objects.create", "spotrun/jobs/sec-1/x")
    assert not gi.allowed(policy, f"serviceAccount:{vm_account}", "storage.objects.create", "spotrun/jobs/sec-2/x")
    # a store off GCS keeps the configured account (there is no bucket policy to scope)
    s3_ref = GCPSecrets.from_provider(provider).put("sec-3", {"HF_TOKEN": "x"}, store_url="s3://b/p")
    refs["sec-3"] = s3_ref
    assert read_as(SA, "sec-3") == {"HF_TOKEN": "x"}


def test_an_azure_secrets_job_runs_as_its_own_identity_which_alone_reads_its_secret(
    arm: FakeARM,
    keyvault: FakeKeyVault,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from spotrun.clouds.azure.secrets import AzureSecrets
    from spotrun.clouds.secrets import SECRETS_REF_ENV, SecretsError, encode_ref

    keyvault.attach_arm(arm)
    keyvault.tokens[arm.token] = "controller"  # the controller's one credential, for ARM and the vault
    keyvault.add_identity(IDENTITY)
    for k, v in {**keyvault.controller_env(), **keyvault.vm_env()}.items():
        monkeypatch.setenv(k, v)
    provider = azure(arm)
    refs = {}
    for job in ("sec-1", "sec-2"):
        store = AzureSecrets.from_provider(provider)
        refs[job] = store.put(job, {"API_KEY": f"v-{job}"}, store_url=AZ, region=AZ_OFFER.region)
    sec = dataclasses.replace(boot("sec-1", AZ), env={SECRETS_REF_ENV: encode_ref(refs["sec-1"])})
    inst = provider.launch(AZ_OFFER, spot=True, boot=sec, client_token="s")
    (vm_identity,) = arm.vm(inst.instance_id)["identity"]["userAssignedIdentities"]
    assert vm_identity == refs["sec-1"]["identity"] != IDENTITY
    assert vm_identity.endswith(az.job_identity_name("sec-1"))
    assert AzureSecrets.fetch(refs["sec-1"], tries=1) == {"API_KEY": "v-sec-1"}
    for identity, job in ((IDENTITY, "sec-1"), (vm_identity, "sec-2"), (refs["sec-2"]["identity"], "sec-1")):
        with pytest.raises(SecretsError, match="HTTP 403"):  # the shared identity, the other job's
            AzureSecrets.fetch({**refs[job], "identity": identity}, tries=1)
    assert AzureSecrets.from_provider(provider).delete("sec-1") is True
    principal = arm.managed_identities[vm_identity.lower()]["properties"]["principalId"]
    assert all(a["properties"]["principalId"] != principal for a in keyvault.assignments.values())
    provider.terminate(inst)
    for job in ("sec-1", "sec-2"):
        provider.release_job(job)
    assert arm.managed_identities == {} and arm.storage_assignments == {}


def test_an_azure_identity_that_does_not_exist_is_refused(arm: FakeARM) -> None:
    """ARM resolves a VM's user-assigned identity: one that does not exist is refused."""
    from spotrun.clouds.base import BadRequest

    gone = IDENTITY.replace("spotrun-runner", "not-there")
    missing = AzureProvider(SUBSCRIPTION, RESOURCE_GROUP, endpoint=arm.url, credential=StaticToken(),
                            poll_interval=0.01, identity=gone, imds_endpoint=arm.metadata_endpoint)  # fmt: skip
    with pytest.raises(BadRequest) as refused:
        missing.launch(AZ_OFFER, spot=True, boot=boot("sec-2", "s3://bucket/p"), client_token="t")
    assert refused.value.code == "FailedIdentityOperation"


def test_a_gcp_account_not_yet_visible_to_compute_is_a_passing_fault(gce: FakeGCE) -> None:
    """IAM is eventually consistent: Compute Engine may not see a just-made account for a few
    seconds. The insert's 404 then reads as retryable (Throttled), not as a bad offer."""
    from spotrun.clouds.base import BadRequest, Throttled

    provider = gcp(gce)
    email = provider._job_account(boot("fresh-1", GCS))  # made: IAM and the bucket policy have it
    gce.service_accounts.discard(email)  # ... Compute Engine does not see it yet
    with pytest.raises(Throttled) as lag:
        provider.launch(GCP_OFFER, spot=True, boot=boot("fresh-1", GCS), client_token="f")
    assert email in str(lag.value) and not isinstance(lag.value, BadRequest)
    gce.service_accounts.add(email)  # now visible: the retried launch goes through
    inst = provider.launch(GCP_OFFER, spot=True, boot=boot("fresh-1", GCS), client_token="f")
    assert gce.instance(inst.instance_id)["serviceAccounts"][0]["email"] == email
