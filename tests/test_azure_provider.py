"""AzureProvider and AzureNotice against the local fake of Azure Resource Manager
(tests/fakes/azure_server.py), through the real azure-mgmt-compute/-network clients over HTTP."""

from __future__ import annotations

import base64
import subprocess
import sys
from typing import Any

import pytest

from spotrun.catalog.model import Offer
from spotrun.clock import FakeClock
from spotrun.clouds.azure import identity as azure_identity
from spotrun.clouds.azure.notice import AzureNotice
from spotrun.clouds.azure.provider import AzureProvider
from spotrun.clouds.base import (
    AuthError,
    BadRequest,
    Boot,
    InstanceStatus,
    NoCapacity,
    PriceTooLow,
    ProviderError,
    QuotaExceeded,
    Throttled,
    extract_boot,
)
from tests.fakes.azure_server import RESOURCE_GROUP, SUBSCRIPTION, FakeARM, StaticToken, arm_fixture, arm_server_fixture  # noqa: F401  (fixtures)

IDENTITY = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/spotrun-runner"
)


def offer(region: str = "eastus", size: str = "Standard_NC4as_T4_v3", zone: str = "") -> Offer:
    return Offer("azure", region, zone, size, "T4", 1, 16.0, 4, 28, 0.16, 0.53, 0.1)


def boot(job: str = "train-0101-abc123", attempt: int = 1) -> Boot:
    return Boot(job_id=job, attempt=attempt, store_url="az://ckpt@acct/team", job_prefix=f"jobs/{job}")


def make_provider(fake: FakeARM, **kw: Any) -> AzureProvider:
    options: dict[str, Any] = {
        "endpoint": fake.url,
        "credential": StaticToken(),
        "imds_endpoint": fake.metadata_endpoint,
        "clock": FakeClock(),
        "poll_interval": 0.01,
        "identity": IDENTITY,
        "client_options": {"retry_backoff_factor": 0.0},  # azure-core's own retries, without the waits
    }
    options.update(kw)
    return AzureProvider(SUBSCRIPTION, RESOURCE_GROUP, **options)


@pytest.fixture
def provider(arm: FakeARM) -> AzureProvider:
    return make_provider(arm)


def vm_puts(fake: FakeARM) -> list[Any]:
    return fake.requests_to("PUT", r"/virtualMachines/")


def leftovers(fake: FakeARM) -> list[str]:
    """VMs, NICs and public IPs (the shared VNet/NSG stay by design)."""
    return sorted(r["name"] for kind in ("vm", "nic", "pip") for r in fake.of_kind(kind))


# ---------------------------------------------------------------------- what is sent


def test_spot_vm_request_body(provider: AzureProvider, arm: FakeARM) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="tok-1")
    (req,) = vm_puts(arm)
    body, props = req.body, req.body["properties"]
    assert props["priority"] == "Spot" and props["evictionPolicy"] == "Delete"
    assert props["billingProfile"] == {"maxPrice": -1}
    assert props["hardwareProfile"] == {"vmSize": "Standard_NC4as_T4_v3"}
    assert body["tags"]["spotrun-job"] == "train-0101-abc123" and body["tags"]["spotrun-attempt"] == "1"
    job_identity = IDENTITY.replace("spotrun-runner", azure_identity.job_identity_name("train-0101-abc123"))
    assert body["identity"] == {"type": "UserAssigned", "userAssignedIdentities": {job_identity: {}}}  # its own
    assert props["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
    assert props["storageProfile"]["imageReference"]["publisher"] == "microsoft-dsvm"
    (nic_ref,) = props["networkProfile"]["networkInterfaces"]
    assert nic_ref["properties"]["deleteOption"] == "Delete"
    os_profile = props["osProfile"]
    assert "adminPassword" not in os_profile
    assert os_profile["linuxConfiguration"]["disablePasswordAuthentication"] is True
    assert os_profile["linuxConfiguration"]["ssh"]["publicKeys"][0]["keyData"].startswith("ssh-rsa ")
    sent = extract_boot(base64.b64decode(os_profile["customData"]).decode())
    assert sent.notice == {
        "kind": "azure",
        "endpoint": f"{arm.url}/_vm/{inst.instance_id}",
        "vm_name": inst.instance_id,
    }
    assert (sent.job_id, sent.attempt, sent.store_url) == ("train-0101-abc123", 1, "az://ckpt@acct/team")
    assert (inst.provider, inst.region, inst.instance_type, inst.spot) == (
        "azure",
        "eastus",
        "Standard_NC4as_T4_v3",
        True,
    )


def test_no_inbound_path_to_the_vm(provider: AzureProvider, arm: FakeARM) -> None:
    provider.launch(offer(), spot=True, boot=boot(), client_token="n")
    (nsg,) = arm.of_kind("nsg")
    assert nsg["properties"]["securityRules"] == []  # only Azure's defaults: inbound from outside denied
    (nic,) = arm.of_kind("nic")
    assert nic["properties"]["networkSecurityGroup"]["id"] == nsg["id"]
    # egress through a public IP (tests/test_egress.py); inbound closed by the NSG, no rule added
    (pip,) = arm.of_kind("pip")
    assert [cfg["properties"]["publicIPAddress"]["id"] for cfg in nic["properties"]["ipConfigurations"]] == [pip["id"]]
    assert not arm.requests_to("PUT", r"securityRules")


def test_max_price_zone_and_on_demand(arm: FakeARM) -> None:
    make_provider(arm, max_price=0.25).launch(offer(zone="eastus-2"), spot=True, boot=boot(), client_token="a")
    body = vm_puts(arm)[-1].body
    assert body["properties"]["billingProfile"] == {"maxPrice": 0.25} and body["zones"] == ["2"]
    inst = make_provider(arm).launch(offer(), spot=False, boot=boot(attempt=2), client_token="b")
    props = vm_puts(arm)[-1].body["properties"]
    assert props["priority"] == "Regular" and "evictionPolicy" not in props and "billingProfile" not in props
    assert inst.spot is False


def test_network_is_made_once_per_location(provider: AzureProvider, arm: FakeARM) -> None:
    provider.launch(offer(), spot=True, boot=boot(), client_token="1")
    provider.launch(offer(), spot=True, boot=boot(attempt=2), client_token="2")
    fresh = make_provider(arm)  # another controller process: finds the VNet/NSG instead of re-creating
    fresh.launch(offer(), spot=True, boot=boot(attempt=3), client_token="3")
    assert len(arm.requests_to("PUT", r"/virtualNetworks/")) == 1
    assert len(arm.requests_to("PUT", r"/networkSecurityGroups/")) == 1
    assert len(arm.of_kind("nic")) == 3


# ---------------------------------------------------------------------- idempotency


def test_launch_is_idempotent_on_the_client_token(provider: AzureProvider, arm: FakeARM) -> None:
    first = provider.launch(offer(), spot=True, boot=boot(), client_token="same")
    again = make_provider(arm).launch(offer(), spot=True, boot=boot(), client_token="same")
    assert first.instance_id == again.instance_id and first.details["vm_id"] == again.details["vm_id"]
    assert len(vm_puts(arm)) == 1 and len(arm.of_kind("nic")) == 1


# ---------------------------------------------------------------------- errors


QUOTA_TEXT = (
    "Operation could not be completed as it results in exceeding approved standardNCASv3_T4 Family "
    "Cores quota. Additional details - Deployment Model: Resource Manager, Location: eastus"
)


@pytest.mark.parametrize(
    "code,async_,message,expected",
    [
        ("SkuNotAvailable", False, "", NoCapacity),
        ("AllocationFailed", True, "", NoCapacity),
        ("ZonalAllocationFailed", True, "", NoCapacity),
        ("OverconstrainedAllocationRequest", True, "", NoCapacity),
        ("SpotPriceGreaterThanProvidedMaxPrice", False, "", PriceTooLow),
        ("OperationNotAllowed", False, QUOTA_TEXT, QuotaExceeded),
        ("QuotaExceeded", False, "", QuotaExceeded),
        ("InvalidParameter", False, "The value of parameter imageReference is invalid.", BadRequest),
    ],
)
def test_errors_translate_by_code_and_leave_nothing(
    provider: AzureProvider, arm: FakeARM, code: str, async_: bool, message: str, expected: type
) -> None:
    arm.fail_next_create(code, message, async_=async_, status=400 if code == "InvalidParameter" else 409)
    with pytest.raises(expected) as info:
        provider.launch(offer(), spot=True, boot=boot(), client_token="t")
    assert info.value.code == code
    if expected is QuotaExceeded:
        assert info.value.scope == "region"
    assert leftovers(arm) == []  # an async failure left a Failed VM + NIC in Azure: both cleaned up
    assert provider.list_owned("train-0101-abc123") == []


def test_restricted_sku_is_no_capacity_before_anything_is_made(provider: AzureProvider, arm: FakeARM) -> None:
    arm.restrict_sku("westus2", "Standard_NC6s_v3", reason="QuotaId")
    arm.restrict_sku("westus2", "Standard_NC4as_T4_v3")  # NotAvailableForSubscription
    with pytest.raises(NoCapacity, match="SkuNotAvailable.*QuotaId"):
        provider.launch(offer("westus2", "Standard_NC6s_v3"), spot=True, boot=boot(), client_token="r")
    assert not arm.requests_to("PUT", r"/networkInterfaces/|/virtualMachines/")
    # A size this subscription may never use is a bad offer, not a shortage to wait out.
    with pytest.raises(BadRequest, match="not available for this subscription"):
        provider.launch(offer("westus2", "Standard_NC4as_T4_v3"), spot=True, boot=boot(), client_token="q")
    with pytest.raises(BadRequest, match="not offered"):
        provider.launch(offer("westus2", "Standard_ND96_nope"), spot=True, boot=boot(), client_token="s")
    inst = provider.launch(offer("westus2", "Standard_NC24ads_A100_v4"), spot=True, boot=boot(), client_token="u")
    assert inst.region == "westus2"


def test_throttling_is_retried_then_reported(provider: AzureProvider, arm: FakeARM) -> None:
    arm.throttle_next(2)  # azure-core retries 429 (3 times by default), then the call goes through
    provider.launch(offer(), spot=True, boot=boot(), client_token="a")
    arm.throttle_next(10)
    with pytest.raises(Throttled, match="TooManyRequests"):
        provider.list_owned("x")


def test_bad_token_is_an_auth_error(arm: FakeARM) -> None:
    provider = make_provider(arm, credential=StaticToken("stale"))
    with pytest.raises(AuthError):
        provider.launch(offer(), spot=True, boot=boot(), client_token="a")
    assert provider.check()["usable"] is False


def test_check_without_launching(arm: FakeARM) -> None:
    report = make_provider(arm).check()
    assert report["usable"] is True and RESOURCE_GROUP in report["detail"]
    missing = AzureProvider(SUBSCRIPTION, "no-such-group", endpoint=arm.url, credential=StaticToken()).check()
    assert missing["usable"] is False and "ResourceGroupNotFound" in missing["detail"]
    assert vm_puts(arm) == []


# ---------------------------------------------------------------------- lifecycle


def test_poll_through_an_eviction(provider: AzureProvider, arm: FakeARM) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="p")
    assert provider.poll(inst).status == InstanceStatus.RUNNING
    arm.preempt(inst.instance_id)
    assert provider.poll(inst).status == InstanceStatus.RUNNING  # the notice is the VM's business
    arm.reclaim(inst.instance_id)
    assert provider.poll(inst).status == InstanceStatus.PREEMPTED
    assert leftovers(arm) == []  # evictionPolicy Delete + deleteOption Delete: nothing billed after
    provider.terminate(inst)  # idempotent on a VM that is already gone


def test_terminate_deletes_vm_and_nic_and_poll_says_terminated(provider: AzureProvider, arm: FakeARM) -> None:
    a = provider.launch(offer(), spot=True, boot=boot(), client_token="a")
    b = provider.launch(offer(), spot=True, boot=boot(attempt=2), client_token="b")
    provider.terminate(a)
    provider.terminate(a)
    assert provider.poll(a).status == InstanceStatus.TERMINATED
    assert leftovers(arm) == sorted([b.instance_id, f"{b.instance_id}-nic", f"{b.instance_id}-ip"])
    arm.guest_shutdown(b.instance_id)
    assert provider.poll(b).status == InstanceStatus.TERMINATED


def test_list_owned_by_tag(provider: AzureProvider, arm: FakeARM) -> None:
    a = provider.launch(offer(), spot=True, boot=boot("job-a"), client_token="1")
    provider.launch(offer(), spot=True, boot=boot("job-b"), client_token="2")
    owned = provider.list_owned("job-a")
    assert [(i.instance_id, i.job_id, i.attempt) for i in owned] == [(a.instance_id, "job-a", 1)]


# ---------------------------------------------------------------------- the Agent's notice watcher


def test_scheduled_events_watcher_and_approval(provider: AzureProvider, arm: FakeARM) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="n")
    other = provider.launch(offer(), spot=True, boot=boot(attempt=2), client_token="m")
    clock = FakeClock(start=__import__("time").time())
    watcher = AzureNotice(endpoint=f"{arm.url}/_vm/{inst.instance_id}", vm_name=inst.instance_id, clock=clock)
    assert watcher.check() is None
    arm.preempt(other.instance_id)
    assert watcher.check() is None  # another VM's event
    event = arm.preempt(inst.instance_id)
    left = watcher.check()
    assert left is not None and 28.0 <= left <= 30.0
    clock.advance(10)
    left2 = watcher.check()
    assert left2 is not None and abs((left - left2) - 10) < 1e-6
    assert watcher.event_id == event["EventId"]
    watcher.acknowledge()  # after the upload: Azure may take the VM now
    assert arm.acknowledged == [event["EventId"]]
    assert provider.poll(inst).status == InstanceStatus.PREEMPTED
    sent = arm.requests_to("GET", r"/scheduledevents$")
    assert sent and all(r.header("metadata") == "true" and r.query["api-version"] == "2020-07-01" for r in sent)


def test_notice_watcher_treats_an_unreachable_endpoint_as_no_notice() -> None:
    watcher = AzureNotice(endpoint="http://127.0.0.1:9", timeout=0.2)
    assert watcher.check() is None
    watcher.acknowledge()  # nothing seen: nothing to approve


def test_nothing_imports_the_sdk_until_used() -> None:
    code = (
        "import sys, spotrun.clouds.azure.provider, spotrun.clouds.azure.store, spotrun.clouds.azure.notice;"
        "bad = [m for m in sys.modules if m.startswith('azure')]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize(
    "code,status,message,expected",
    [
        ("OperationNotAllowed", 409, "The requested max price is lower than the current max price", PriceTooLow),
        ("OperationNotAllowed", 409, "Operation is not allowed on a VM being deleted", BadRequest),
        ("", 429, "", Throttled),
        ("AuthorizationFailed", 403, "does not have authorization", AuthError),
        ("InternalServerError", 500, "", ProviderError),
    ],
)
def test_classify_table(code: str, status: int, message: str, expected: type) -> None:
    from spotrun.clouds.azure.provider import classify

    assert type(classify(code, message, status=status)) is expected


def test_an_unreachable_endpoint_is_a_provider_error() -> None:
    dead = AzureProvider(
        SUBSCRIPTION,
        RESOURCE_GROUP,
        endpoint="http://127.0.0.1:9",
        credential=StaticToken(),
        client_options={"retry_total": 0},
    )
    with pytest.raises(ProviderError, match="unreachable"):
        dead.list_owned("job")
    assert dead.check()["usable"] is False


def test_the_vm_learns_the_storage_account_name_never_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from spotrun.clouds.azure.provider import storage_account_env

    for var in ("AZURE_STORAGE_ACCOUNT_URL", "AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_CONNECTION_STRING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=c2VjcmV0=="
    )
    assert storage_account_env("az://ckpt/jobs") == {"AZURE_STORAGE_ACCOUNT": "acme"}
    assert storage_account_env("az://ckpt@other/jobs") == {}  # named in the URL already
    assert storage_account_env("s3://b/p") == {}
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", "named")
    assert storage_account_env("az://ckpt/jobs") == {"AZURE_STORAGE_ACCOUNT": "named"}
