"""The GCE and ARM fakes refuse what the real APIs refuse, with the real status and error code, and
accept what spotrun itself sends (issue #12, item 4).

Each rule: spotrun's own request body (built by the provider) passes; the same body with one field
made wrong is refused. Bodies are sent as raw JSON so that a field the SDK could not even express
(an unknown member) reaches the fake too.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from spotrun.catalog.model import Offer
from spotrun.clock import FakeClock
from spotrun.clouds.azure.provider import AzureProvider
from spotrun.clouds.base import Boot
from spotrun.clouds.gcp.provider import GCPProvider
from tests.fakes.azure_server import (  # noqa: F401  (fixtures)
    ARM_TOKEN,
    RESOURCE_GROUP,
    SUBSCRIPTION,
    FakeARM,
    StaticToken,
    arm_fixture,
    arm_server_fixture,
)
from tests.fakes.gce_server import (  # noqa: F401  (fixtures)
    GOOD_TOKEN,
    PROJECT,
    FakeGCE,
    gce_credentials,
    gce_fixture,
    gce_server_fixture,
)

SA = "spotrun-runner@spotrun-test.iam.gserviceaccount.com"
IDENTITY = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/spotrun-runner"
)
ZONE = "us-central1-a"


def boot(job: str = "strict-job") -> Boot:
    return Boot(job_id=job, attempt=1, store_url="gs://bucket/team", job_prefix=f"jobs/{job}")


# ---------------------------------------------------------------------- GCE


def gcp(gce: FakeGCE) -> GCPProvider:
    return GCPProvider(PROJECT, endpoint=gce.url, credentials=gce_credentials(), service_account=SA, clock=FakeClock())


def gce_body(gce: FakeGCE, itype: str = "n1-standard-8", gpu: str = "T4", *, spot: bool = True) -> dict[str, Any]:
    """What spotrun's GCP provider sends for this offer, as the JSON on the wire."""
    from google.cloud import compute_v1

    provider = gcp(gce)
    offer = Offer("gcp", "us-central1", ZONE, itype, gpu, 1, 16.0, 8, 30, 0.2, 0.6, 0.1)
    acc = "nvidia-tesla-t4" if itype.startswith("n1-") else None
    inst = provider.instance_body(offer, spot=spot, boot=boot(), name="strict-vm", accelerator=acc, token="t")
    return json.loads(compute_v1.Instance.to_json(inst, always_print_fields_with_no_presence=False))


def gce_insert(gce: FakeGCE, body: dict[str, Any]) -> tuple[int, str]:
    """POST instances.insert; (HTTP status, errors[0].reason) — (200, "") when accepted."""
    url = f"{gce.url}/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances"
    r = requests.post(url, json=body, headers={"Authorization": f"Bearer {GOOD_TOKEN}"}, timeout=10)
    if r.status_code == 200:
        return 200, ""
    return r.status_code, r.json()["error"]["errors"][0]["reason"]


def set_path(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node: Any = out
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    if value is DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return out


DELETE = object()


OWN = [("n1-standard-8", "T4", True), ("a2-highgpu-1g", "A100", True), ("g2-standard-8", "L4", False),
       ("a4-highgpu-8g", "B200", True)]  # fmt: skip


@pytest.mark.parametrize("itype,gpu,spot", OWN)
def test_gce_accepts_spotruns_own_inserts(gce: FakeGCE, itype: str, gpu: str, spot: bool) -> None:
    assert gce_insert(gce, gce_body(gce, itype, gpu, spot=spot)) == (200, "")


DISK0 = "disks.0.initializeParams"
NIC0 = "networkInterfaces.0"
GCE_RULES: list[tuple[str, str, Any, int, str]] = [
    # (rule, field path, bad value, real status, real errors[].reason)
    ("unknown field (SDK schema)", "scheduling.preemptibleSpot", True, 400, "invalid"),
    ("wrong type (SDK schema)", "scheduling.automaticRestart", "no", 400, "invalid"),
    ("unknown enum value", "scheduling.provisioningModel", "CHEAP", 400, "invalid"),
    ("GPU VM must not live-migrate", "scheduling.onHostMaintenance", "MIGRATE", 400, "badRequest"),
    ("GPU VM default is MIGRATE", "scheduling.onHostMaintenance", DELETE, 400, "badRequest"),
    ("termination action only on SPOT", "scheduling.provisioningModel", "STANDARD", 400, "invalid"),
    ("unknown machine type", "machineType", f"zones/{ZONE}/machineTypes/n1-standard-7", 400, "invalid"),
    ("unknown image", f"{DISK0}.sourceImage", "projects/debian-cloud/global/images/family/no", 404, "notFound"),
    ("unknown disk type", f"{DISK0}.diskType", f"zones/{ZONE}/diskTypes/pd-fast", 400, "invalid"),
    ("disk type, other zone", f"{DISK0}.diskType", "zones/us-east1-c/diskTypes/pd-balanced", 400, "invalid"),
    ("unknown network", f"{NIC0}.network", f"projects/{PROJECT}/global/networks/no", 404, "notFound"),
    ("unknown subnetwork", f"{NIC0}.subnetwork", "regions/us-central1/subnetworks/no", 404, "notFound"),
    ("unknown SA", "serviceAccounts.0.email", "ghost@spotrun-test.iam.gserviceaccount.com", 404, "notFound"),
    ("unknown GPU", "guestAccelerators.0.acceleratorType", f"zones/{ZONE}/acceleratorTypes/nv-h9", 400, "invalid"),
]  # fmt: skip


@pytest.mark.parametrize("rule,path,value,status,reason", GCE_RULES, ids=[r[0] for r in GCE_RULES])
def test_gce_refuses_what_compute_engine_refuses(
    gce: FakeGCE, rule: str, path: str, value: Any, status: int, reason: str
) -> None:
    good = gce_body(gce)
    assert gce_insert(gce, good) == (200, "")
    gce.reset()
    assert gce_insert(gce, set_path(good, path, value)) == (status, reason), rule


def test_gce_hyperdisk_only_series_refuse_persistent_disk(gce: FakeGCE) -> None:
    body = set_path(gce_body(gce, "a4-highgpu-8g", "B200"), "disks.0.initializeParams.diskType",
                    f"zones/{ZONE}/diskTypes/pd-balanced")  # fmt: skip
    assert gce_insert(gce, body) == (400, "badRequest")


def test_gce_unknown_zone(gce: FakeGCE) -> None:
    url = f"{gce.url}/compute/v1/projects/{PROJECT}/zones/us-central1-z/instances"
    r = requests.post(url, json=gce_body(gce), headers={"Authorization": f"Bearer {GOOD_TOKEN}"}, timeout=10)
    assert (r.status_code, r.json()["error"]["errors"][0]["reason"]) == (400, "invalid")


def test_gce_operations_take_several_polls_and_wait_waits(gce: FakeGCE) -> None:
    gce.op_seconds = 0.5
    try:
        op = requests.post(
            f"{gce.url}/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances",
            json=gce_body(gce),
            headers={"Authorization": f"Bearer {GOOD_TOKEN}"},
            timeout=10,
        ).json()
        ops = f"{gce.url}/compute/v1/projects/{PROJECT}/zones/{ZONE}/operations/{op['name']}"
        auth = {"Authorization": f"Bearer {GOOD_TOKEN}"}
        first = requests.get(ops, headers=auth, timeout=10).json()
        assert first["status"] == "RUNNING" and gce.instance("strict-vm") is None
        t0 = time.monotonic()
        done = requests.post(ops + "/wait", headers=auth, timeout=10).json()
        assert done["status"] == "DONE" and time.monotonic() - t0 > 0.2  # it waited for the operation
        assert gce.instance("strict-vm") is not None
    finally:
        gce.op_seconds = 0.1


# ---------------------------------------------------------------------- ARM


def azure(arm: FakeARM, **kw: Any) -> AzureProvider:
    options: dict[str, Any] = {"endpoint": arm.url, "credential": StaticToken(), "poll_interval": 0.01}
    options.update(kw)
    return AzureProvider(SUBSCRIPTION, RESOURCE_GROUP, identity=IDENTITY, **options)


def azure_offer(region: str = "eastus", size: str = "Standard_NC4as_T4_v3", zone: str = "") -> Offer:
    return Offer("azure", region, zone, size, "T4", 1, 16.0, 4, 28, 0.2, 0.5, 0.05)


def vm_body(arm: FakeARM, *, spot: bool = True, zone: str = "") -> dict[str, Any]:
    rg = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
    nic = f"{rg}/providers/Microsoft.Network/networkInterfaces/n"
    return azure(arm).vm_body(azure_offer(zone=zone), spot=spot, boot=boot(), name="strict-vm", nic_id=nic, token="t")


def arm_put(arm: FakeARM, body: dict[str, Any]) -> tuple[int, str]:
    url = (
        f"{arm.url}/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
        "Microsoft.Compute/virtualMachines/strict-vm?api-version=2024-07-01"
    )
    r = requests.put(url, json=body, headers={"Authorization": f"Bearer {ARM_TOKEN}"}, timeout=10)
    return r.status_code, (r.json() or {}).get("error", {}).get("code", "") if r.content else ""


@pytest.mark.parametrize("spot,zone", [(True, ""), (False, ""), (True, "eastus-2")])
def test_arm_accepts_spotruns_own_launches(arm: FakeARM, spot: bool, zone: str) -> None:
    inst = azure(arm).launch(azure_offer(zone=zone), spot=spot, boot=boot(), client_token=f"ok-{spot}-{zone}")
    assert arm.vm(inst.instance_id)["properties"]["provisioningState"] == "Succeeded"


def _spot_fields_on_regular(body: dict[str, Any]) -> dict[str, Any]:
    body["properties"]["priority"] = "Regular"
    body["properties"]["billingProfile"] = {"maxPrice": -1}
    return body


def _eviction_on_regular(body: dict[str, Any]) -> dict[str, Any]:
    body["properties"]["priority"] = "Regular"
    body["properties"].pop("billingProfile")
    return body


def _key_path(body: dict[str, Any]) -> dict[str, Any]:
    body["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["path"] = "/root/.ssh/authorized_keys"
    return body


def _image(body: dict[str, Any]) -> dict[str, Any]:
    body["properties"]["storageProfile"]["imageReference"]["sku"] = "1804"
    return body


def _unknown_member(body: dict[str, Any]) -> dict[str, Any]:
    body["properties"]["spotPrice"] = 0.1
    return body


def _location(body: dict[str, Any]) -> dict[str, Any]:
    body["location"] = "moonbase1"
    return body


def _size(body: dict[str, Any]) -> dict[str, Any]:
    body["properties"]["hardwareProfile"]["vmSize"] = "Standard_NC4as_T9_v9"
    return body


def _zone(body: dict[str, Any]) -> dict[str, Any]:
    body["zones"] = ["7"]
    return body


def _identity(body: dict[str, Any]) -> dict[str, Any]:
    body["identity"] = {"type": "UserAssigned", "userAssignedIdentities": {"spotrun-runner": {}}}
    return body


ARM_RULES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], int, str]] = [
    ("unknown member (SDK model)", _unknown_member, 400, "InvalidRequestContent"),
    ("billingProfile only with Spot", _spot_fields_on_regular, 400, "InvalidParameter"),
    ("evictionPolicy only with Spot", _eviction_on_regular, 400, "InvalidParameter"),
    ("ssh key path is /home/<admin>/.ssh/authorized_keys", _key_path, 400, "InvalidParameter"),
    ("image must exist", _image, 404, "PlatformImageNotFound"),
    ("unknown location", _location, 400, "LocationNotAvailableForResourceType"),
    ("unknown size", _size, 400, "InvalidParameter"),
    ("unknown zone", _zone, 400, "InvalidParameter"),
    ("identity must be a resource id", _identity, 400, "InvalidParameter"),
]


@pytest.mark.parametrize("rule,mutate,status,code", ARM_RULES, ids=[r[0] for r in ARM_RULES])
def test_arm_refuses_what_azure_refuses(
    arm: FakeARM, rule: str, mutate: Callable[[dict[str, Any]], dict[str, Any]], status: int, code: str
) -> None:
    assert arm_put(arm, mutate(vm_body(arm))) == (status, code), rule


def test_arm_zone_restriction_in_skus_and_on_put(arm: FakeARM) -> None:
    arm.restrict_zones("eastus", "Standard_NC4as_T4_v3", {"2"})
    assert arm_put(arm, vm_body(arm, zone="eastus-2")) == (409, "SkuNotAvailable")
    # spotrun reads the restriction from the SKU list and skips the zone before creating anything
    from spotrun.clouds.base import BadRequest

    arm.requests.clear()
    with pytest.raises(BadRequest, match="SkuNotAvailable"):
        azure(arm).launch(azure_offer(zone="eastus-2"), spot=True, boot=boot(), client_token="z2")
    assert arm.requests_to("PUT", r"/networkInterfaces/|/virtualMachines/") == []


def test_arm_network_puts_are_asynchronous(arm: FakeARM) -> None:
    url = (
        f"{arm.url}/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
        "Microsoft.Network/networkSecurityGroups/nsg1?api-version=2024-05-01"
    )
    auth = {"Authorization": f"Bearer {ARM_TOKEN}"}
    r = requests.put(url, json={"location": "eastus", "properties": {"securityRules": []}}, headers=auth, timeout=10)
    assert r.status_code == 201 and r.json()["properties"]["provisioningState"] == "Updating"
    op = r.headers["Azure-AsyncOperation"]
    statuses = []
    while not statuses or statuses[-1] == "InProgress":
        statuses.append(requests.get(op, headers=auth, timeout=10).json()["status"])
        assert len(statuses) < 10
    assert statuses[-1] == "Succeeded"
    assert requests.get(url, headers=auth, timeout=10).json()["properties"]["provisioningState"] == "Succeeded"


# ---------------------------------------------------------------------- preemption timing


def test_gce_preempted_spot_vm_is_deleted_when_the_notice_ends(gce: FakeGCE) -> None:
    inst = gcp(gce).launch(
        Offer("gcp", "us-central1", ZONE, "n1-standard-8", "T4", 1, 16.0, 8, 30, 0.2, 0.6, 0.1),
        spot=True,
        boot=boot(),
        client_token="pre",
    )
    gce.preempt(inst.instance_id, reclaim_after=0.3)  # GCE: 30 s
    assert gce.instance(inst.instance_id)["status"] == "STOPPING"
    deadline = time.monotonic() + 5
    while gce.instance(inst.instance_id) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gce.instance(inst.instance_id) is None  # termination action DELETE, nobody called reclaim


def test_arm_preempt_event_evicts_at_not_before_without_approval(arm: FakeARM) -> None:
    from email.utils import parsedate_to_datetime

    inst = azure(arm).launch(azure_offer(), spot=True, boot=boot(), client_token="pre")
    arm.notice_seconds = 1.5
    try:
        event = arm.preempt(inst.instance_id)
    finally:
        arm.notice_seconds = 30.0
    assert event["EventType"] == "Preempt" and event["Resources"] == [inst.instance_id]
    assert -1 < parsedate_to_datetime(event["NotBefore"]).timestamp() - time.time() < 3
    assert arm.vm(inst.instance_id) is not None  # not before NotBefore
    deadline = time.monotonic() + 5
    while arm.vm(inst.instance_id) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert arm.vm(inst.instance_id) is None and arm.evicted == [inst.instance_id]
