"""GCPProvider and GCPNotice against the local fake of the Compute Engine API (tests/fakes/gce_server.py),
through the real google-cloud-compute client over HTTP."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from typing import Any

import pytest

from spotrun.catalog.model import Offer
from spotrun.clock import FakeClock
from spotrun.clouds.base import (
    AuthError,
    BadRequest,
    Boot,
    InstanceStatus,
    NoCapacity,
    ProviderError,
    QuotaExceeded,
    Throttled,
    extract_boot,
)
from spotrun.clouds.gcp.notice import GCPNotice
from spotrun.clouds.gcp.provider import DEFAULT_IMAGE, STORAGE_SCOPE, GCPProvider, request_id
from tests.fakes.gce_server import PROJECT, FakeGCE, gce_credentials, gce_fixture, gce_server_fixture  # noqa: F401  (fixtures)

SA = "spotrun-runner@spotrun-test.iam.gserviceaccount.com"


def offer(zone: str = "us-central1-a", itype: str = "n1-standard-8", gpu: str = "T4", count: int = 1) -> Offer:
    return Offer("gcp", zone.rsplit("-", 1)[0], zone, itype, gpu, count, 16.0, 8, 30, 0.2, 0.6, 0.1)


def boot(job: str = "train-0101-abc123", attempt: int = 1) -> Boot:
    return Boot(job_id=job, attempt=attempt, store_url="gs://bucket/team", job_prefix=f"jobs/{job}")


def make_provider(fake: FakeGCE, **kw: Any) -> GCPProvider:
    options: dict[str, Any] = {
        "endpoint": fake.url,
        "credentials": gce_credentials(),
        "imds_endpoint": fake.metadata_endpoint,
        "clock": FakeClock(),
        "service_account": SA,
    }
    options.update(kw)
    return GCPProvider(PROJECT, **options)


@pytest.fixture
def provider(gce: FakeGCE) -> GCPProvider:
    return make_provider(gce)


def inserts(fake: FakeGCE) -> list[Any]:
    return fake.requests_to("POST", r"/instances$")


# ---------------------------------------------------------------------- what is sent


def test_spot_n1_request_body(provider: GCPProvider, gce: FakeGCE) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="tok-1")
    (req,) = inserts(gce)
    body = req.body
    assert req.query["requestId"] == request_id("tok-1")
    assert body["scheduling"] == {
        "provisioningModel": "SPOT",
        "instanceTerminationAction": "DELETE",
        "onHostMaintenance": "TERMINATE",
        "automaticRestart": False,
    }
    assert body["machineType"] == "zones/us-central1-a/machineTypes/n1-standard-8"
    assert body["guestAccelerators"] == [
        {"acceleratorType": "zones/us-central1-a/acceleratorTypes/nvidia-tesla-t4", "acceleratorCount": 1}
    ]
    assert body["disks"][0]["initializeParams"]["sourceImage"] == DEFAULT_IMAGE
    assert body["disks"][0]["autoDelete"] is True
    # an ephemeral external IP for egress, behind spotrun's deny-ingress rule (tests/test_egress.py)
    assert [nic.get("accessConfigs") for nic in body["networkInterfaces"]] == [
        [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]
    ]
    assert body["tags"] == {"items": ["spotrun-no-ingress"]}  # the deny-ingress rule's target, nothing else
    # the job's own account (clouds/gcp/identity.py; tests/test_identity_jobs.py), not the configured SA
    digest = hashlib.sha256(b"train-0101-abc123").hexdigest()[:8]
    job_sa = f"spotrun-train-0101-ab-{digest}@{PROJECT}.iam.gserviceaccount.com"
    assert body["serviceAccounts"] == [{"email": job_sa, "scopes": [STORAGE_SCOPE]}]
    assert body["labels"]["spotrun-job"] == "train-0101-abc123" and body["labels"]["spotrun-attempt"] == "1"
    items = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    sent = extract_boot(items["startup-script"])
    assert sent.notice == {"kind": "gcp", "endpoint": f"{gce.url}/_metadata/{inst.instance_id}"}
    assert (sent.job_id, sent.attempt, sent.store_url) == ("train-0101-abc123", 1, "gs://bucket/team")
    assert (inst.provider, inst.zone, inst.region, inst.instance_type, inst.spot) == (
        "gcp",
        "us-central1-a",
        "us-central1",
        "n1-standard-8",
        True,
    )
    # the extended operation was polled through our own zone-operations client, on the fake
    assert gce.requests_to("POST", r"/operations/.+/wait$")


@pytest.mark.parametrize("itype,gpu", [("a2-highgpu-1g", "A100"), ("g2-standard-8", "L4"), ("a3-highgpu-8g", "H100")])
def test_accelerator_optimized_types_carry_their_own_gpus(
    provider: GCPProvider, gce: FakeGCE, itype: str, gpu: str
) -> None:
    provider.launch(offer("us-central1-b", itype, gpu), spot=True, boot=boot(), client_token="t")
    assert "guestAccelerators" not in inserts(gce)[0].body  # the fake rejects extra GPUs on these, as GCE does


def test_on_demand_uses_standard_provisioning(provider: GCPProvider, gce: FakeGCE) -> None:
    inst = provider.launch(offer(), spot=False, boot=boot(), client_token="od")
    scheduling = inserts(gce)[0].body["scheduling"]
    assert scheduling["provisioningModel"] == "STANDARD" and "instanceTerminationAction" not in scheduling
    assert inst.spot is False


def test_accelerator_missing_in_zone_is_a_bad_offer(provider: GCPProvider, gce: FakeGCE) -> None:
    gce.accelerators["us-east1-c"].discard("nvidia-tesla-t4")
    with pytest.raises(BadRequest, match="nvidia-tesla-t4"):
        provider.launch(offer("us-east1-c"), spot=True, boot=boot(), client_token="t")
    assert inserts(gce) == []


# ---------------------------------------------------------------------- idempotency


def test_launch_is_idempotent_on_the_client_token(provider: GCPProvider, gce: FakeGCE) -> None:
    first = provider.launch(offer(), spot=True, boot=boot(), client_token="same")
    again = provider.launch(offer(), spot=True, boot=boot(), client_token="same")  # requestId dedup
    gce.request_ids.clear()  # GCE forgets request ids after a while: the name still dedups (409)
    third = provider.launch(offer(), spot=True, boot=boot(), client_token="same")
    assert first.instance_id == again.instance_id == third.instance_id
    assert first.details["id"] == third.details["id"]
    assert len(gce.instances) == 1
    other = provider.launch(offer(), spot=True, boot=boot(), client_token="another")
    assert other.instance_id != first.instance_id and len(gce.instances) == 2


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "code,kwargs,expected,scope",
    [
        ("ZONE_RESOURCE_POOL_EXHAUSTED", {}, NoCapacity, None),  # op error, no httpErrorStatusCode
        ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", {"http_status": 503}, NoCapacity, None),
        (
            "QUOTA_EXCEEDED",
            {
                "quota_metric": "compute.googleapis.com/gpus_all_regions",
                "message": "Quota 'GPUS_ALL_REGIONS' exceeded.  Limit: 0.0 globally.",
            },
            QuotaExceeded,
            "provider",
        ),
        (
            "QUOTA_EXCEEDED",
            {
                "quota_metric": "compute.googleapis.com/nvidia_t4_gpus",
                "message": "Quota 'NVIDIA_T4_GPUS' exceeded.  Limit: 1.0 in region us-central1.",
            },
            QuotaExceeded,
            "region",
        ),
        (
            "QUOTA_EXCEEDED",
            {
                "sync": True,
                "http_status": 403,
                "reason": "quotaExceeded",
                "message": "Quota 'GPUS_ALL_REGIONS' exceeded.  Limit: 0.0 globally.",
            },
            QuotaExceeded,
            "provider",
        ),
        ("UNSUPPORTED_OPERATION", {"message": "Spot VMs are not supported for this machine type"}, BadRequest, None),
        (
            "invalid",
            {"sync": True, "http_status": 400, "message": "Invalid value for field 'resource.disks'"},
            BadRequest,
            None,
        ),
    ],
)
def test_errors_translate_and_leave_nothing(
    provider: GCPProvider, gce: FakeGCE, code: str, kwargs: dict[str, Any], expected: type, scope: str | None
) -> None:
    gce.fail_next_insert(code, **kwargs)
    with pytest.raises(expected) as info:
        provider.launch(offer(), spot=True, boot=boot(), client_token="t")
    assert info.value.code == kwargs.get("reason", code)  # the cloud's own code, for the event log
    if scope:
        assert info.value.scope == scope
    assert gce.instances == {}
    assert provider.list_owned("train-0101-abc123") == []


def test_exhausted_zone_then_another_zone(provider: GCPProvider, gce: FakeGCE) -> None:
    gce.exhaust("us-central1-a")
    with pytest.raises(NoCapacity):
        provider.launch(offer("us-central1-a"), spot=True, boot=boot(), client_token="a")
    inst = provider.launch(offer("us-central1-b"), spot=True, boot=boot(), client_token="b")
    assert inst.zone == "us-central1-b"


def test_rate_limits_are_retried_then_throttled(gce: FakeGCE) -> None:
    clock = FakeClock()
    provider = make_provider(gce, clock=clock, retries=2)
    gce.throttle_next(2)
    provider.launch(offer(), spot=True, boot=boot(), client_token="a")  # two 403 rateLimitExceeded, then fine
    assert clock.now() > 1_700_000_000.0  # backed off (on the injected clock)
    gce.throttle_next(3)
    with pytest.raises(Throttled):
        provider.launch(offer(), spot=True, boot=boot(), client_token="b")


@pytest.mark.parametrize("token", ["expired-token", "forbidden-token"])
def test_bad_credentials_are_auth_errors(gce: FakeGCE, token: str) -> None:
    provider = make_provider(gce, credentials=gce_credentials(token))
    with pytest.raises(AuthError):
        provider.launch(offer(), spot=True, boot=boot(), client_token="a")
    assert provider.check()["usable"] is False


def test_check_finds_the_project_without_launching(gce: FakeGCE) -> None:
    report = make_provider(gce).check()
    assert report["usable"] is True and PROJECT in report["detail"]
    assert inserts(gce) == []
    missing = GCPProvider("no-such-project", endpoint=gce.url, credentials=gce_credentials()).check()
    assert missing["usable"] is False and "no-such-project" in missing["detail"]
    no_identity = GCPProvider(PROJECT, endpoint=gce.url, credentials=gce_credentials()).check()
    assert no_identity["usable"] is False and "gcp.service_account" in no_identity["missing"][0]


# ---------------------------------------------------------------------- lifecycle


def test_poll_through_a_preemption(provider: GCPProvider, gce: FakeGCE) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="p")
    assert provider.poll(inst).status == InstanceStatus.RUNNING
    gce.preempt(inst.instance_id)
    during = provider.poll(inst)  # STOPPING inside the 30 s: the Agent is still uploading
    assert during.status == InstanceStatus.RUNNING and "notice" in during.reason
    gce.reclaim(inst.instance_id)
    assert provider.poll(inst).status == InstanceStatus.PREEMPTED
    asked = gce.requests_to("GET", r"/operations$")[-1].query["filter"]
    assert asked == f'operationType="compute.instances.preempted" AND targetLink="{inst.details["self_link"]}"'
    provider.terminate(inst)  # idempotent on a VM that is already gone


def test_poll_after_our_delete_or_a_shutdown_is_terminated(provider: GCPProvider, gce: FakeGCE) -> None:
    a = provider.launch(offer(), spot=True, boot=boot(), client_token="a")
    b = provider.launch(offer(), spot=True, boot=boot(attempt=2), client_token="b")
    provider.terminate(a)
    provider.terminate(a)
    assert provider.poll(a).status == InstanceStatus.TERMINATED
    gce.guest_shutdown(b.instance_id)
    assert provider.poll(b).status == InstanceStatus.TERMINATED


def test_terminate_spares_a_new_instance_with_the_same_name(provider: GCPProvider, gce: FakeGCE) -> None:
    old = provider.launch(offer(), spot=True, boot=boot(), client_token="x")
    gce.reclaim(old.instance_id)  # (not preempted: simply gone) ...
    gce.instances.clear()
    gce.request_ids.clear()
    new = provider.launch(offer(), spot=True, boot=boot(), client_token="x")  # ... and recreated
    assert new.details["id"] != old.details["id"]
    assert provider.poll(old).status == InstanceStatus.TERMINATED
    provider.terminate(old)
    assert provider.poll(new).status == InstanceStatus.RUNNING


def test_list_owned_finds_the_jobs_instances_in_every_zone(provider: GCPProvider, gce: FakeGCE) -> None:
    a = provider.launch(offer("us-central1-a"), spot=True, boot=boot("job-a"), client_token="1")
    b = provider.launch(offer("europe-west4-a"), spot=True, boot=boot("job-a", 2), client_token="2")
    provider.launch(offer("us-central1-a"), spot=True, boot=boot("job-b"), client_token="3")
    owned = provider.list_owned("job-a")
    assert sorted((i.instance_id, i.zone, i.attempt) for i in owned) == sorted(
        [(a.instance_id, "us-central1-a", 1), (b.instance_id, "europe-west4-a", 2)]
    )
    assert all(i.job_id == "job-a" for i in owned)
    assert provider.list_owned("job-c") == []


def test_sdk_errors_never_escape_untranslated(provider: GCPProvider, gce: FakeGCE) -> None:
    gce.zones.discard("us-east1-c")
    with pytest.raises(ProviderError):
        provider.launch(offer("us-east1-c", "a2-highgpu-1g", "A100"), spot=True, boot=boot(), client_token="z")
    gce.zones.add("us-east1-c")


# ---------------------------------------------------------------------- the Agent's notice watcher


def test_notice_watcher_reads_the_metadata_server(provider: GCPProvider, gce: FakeGCE) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="n")
    clock = FakeClock()
    watcher = GCPNotice(endpoint=f"{gce.url}/_metadata/{inst.instance_id}", clock=clock)
    assert watcher.poll_interval == 1.0
    assert watcher.check() is None
    gce.preempt(inst.instance_id)
    assert watcher.check() == 30.0
    clock.advance(12)
    assert watcher.check() == 18.0
    clock.advance(60)
    assert watcher.check() == 0.0
    watcher.acknowledge()  # nothing to approve on GCP
    sent = gce.requests_to("GET", r"/instance/preempted$")
    assert sent and all(r.header("metadata-flavor") == "Google" for r in sent)


def test_notice_watcher_treats_an_unreachable_server_as_no_notice() -> None:
    assert GCPNotice(endpoint="http://127.0.0.1:9", timeout=0.2).check() is None


def test_nothing_imports_the_sdk_until_used() -> None:
    code = (
        "import sys, spotrun.clouds.gcp.provider, spotrun.clouds.gcp.store, spotrun.clouds.gcp.notice;"
        "bad = [m for m in sys.modules if m.startswith('google')]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize(
    "code,status,metric,expected",
    [
        ("", 429, "", Throttled),
        ("RESOURCE_EXHAUSTED", 429, "", Throttled),
        ("userRateLimitExceeded", 403, "", Throttled),
        ("QUOTA_EXCEEDED", None, "compute.googleapis.com/gpus_all_regions", QuotaExceeded),
        ("insufficientPermissions", 403, "", AuthError),
        ("notFound", 404, "", BadRequest),
        ("SOMETHING_NEW", 500, "", ProviderError),
    ],
)
def test_classify_table(code: str, status: int | None, metric: str, expected: type) -> None:
    from spotrun.clouds.gcp.provider import classify

    err = classify(code, "message", http_status=status, quota_metric=metric)
    assert type(err) is expected


def test_an_unreachable_endpoint_is_a_provider_error() -> None:
    dead = GCPProvider(PROJECT, endpoint="http://127.0.0.1:9", credentials=gce_credentials(), retries=0)
    with pytest.raises(ProviderError, match="unreachable"):
        dead.list_owned("job")
    assert dead.check()["usable"] is False


def test_a_launch_retried_after_a_failed_insert_is_not_answered_with_the_old_failure(
    provider: GCPProvider, gce: FakeGCE
) -> None:
    gce.fail_next_insert("rateLimitExceeded", http_status=429, message="rate limited in the operation")
    with pytest.raises(Throttled):
        provider.launch(offer(), spot=True, boot=boot(), client_token="t")
    # Same client token (the controller's retry): GCE would replay the failed operation for the same
    # request id, so the retry must carry a new one, and it launches.
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t")
    assert inst.zone == "us-central1-a" and len(gce.instances) == 1
