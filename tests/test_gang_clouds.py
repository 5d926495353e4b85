"""Gang launch on the cloud fakes: the placement setting reaches the cloud's request, and a node
the cloud refuses makes the launch all or nothing (the nodes already started are terminated
within the gang's bound). AWS: real boto3 against moto's server."""

from __future__ import annotations

import time
from typing import Any

import pytest

from spotrun.clouds.aws.provider import TAG_JOB, AWSProvider
from spotrun.clouds.base import InstanceStatus, NoCapacity, ProviderError
from spotrun.control.gang import GangProvider
from tests.fakes.aws_placement import serve_placement_groups
from tests.fakes.azure_server import FakeARM, arm_fixture, arm_server_fixture  # noqa: F401
from tests.fakes.gce_server import PROJECT, FakeGCE, gce_fixture, gce_server_fixture  # noqa: F401
from tests.fakes.moto_server import MotoServer, aws, fast_session, moto_server  # noqa: F401
from tests.test_aws_provider import BUCKET, REGION, Recorder, boot, hooks, offer, s3
from tests.test_azure_provider import boot as az_boot
from tests.test_azure_provider import make_provider as make_azure
from tests.test_azure_provider import offer as az_offer
from tests.test_gcp_provider import boot as gcp_boot
from tests.test_gcp_provider import make_provider as make_gcp
from tests.test_gcp_provider import offer as gcp_offer


@pytest.fixture
def aws_provider(aws: MotoServer) -> AWSProvider:  # noqa: F811
    s3().create_bucket(Bucket=BUCKET)
    serve_placement_groups()
    return AWSProvider(region=REGION, session=fast_session(REGION), regions=[REGION])


def _instances(job: str) -> list[dict[str, Any]]:
    ec2 = fast_session(REGION).client("ec2")
    pages = ec2.describe_instances(Filters=[{"Name": f"tag:{TAG_JOB}", "Values": [job]}])
    return [i for r in pages["Reservations"] for i in r["Instances"]]


def test_aws_gang_nodes_go_into_one_cluster_placement_group(aws_provider: AWSProvider) -> None:
    sent = Recorder(aws_provider)
    gang = GangProvider(aws_provider, 2, start_timeout=30, poll_every=0.05)
    inst = gang.launch(offer(), spot=True, boot=boot("job-g"), client_token="tok-g")
    members = gang.members(inst)
    assert len(members) == 2 and gang.poll(inst).status == InstanceStatus.RUNNING
    assert [sent.params(i)["Placement.GroupName"] for i in range(2)] == ["spotrun-job-g"] * 2
    assert [sent.params(i)["Placement.AvailabilityZone"] for i in range(2)] == ["us-east-1a"] * 2
    assert {i["Placement"]["AvailabilityZone"] for i in _instances("job-g")} == {"us-east-1a"}
    ec2 = fast_session(REGION).client("ec2")
    groups = ec2.describe_placement_groups(GroupNames=["spotrun-job-g"])["PlacementGroups"]
    assert [g["Strategy"] for g in groups] == ["cluster"]
    gang.launch(offer(), spot=True, boot=boot("job-g"), client_token="tok-g")  # re-issued: same nodes, same group
    assert len(_instances("job-g")) == 2
    gang.terminate(inst)
    assert {i["State"]["Name"] for i in _instances("job-g")} <= {"shutting-down", "terminated"}
    aws_provider.release_job("job-g")  # the job's end deletes its placement group
    assert [g["GroupName"] for g in ec2.describe_placement_groups()["PlacementGroups"]] == []
    aws_provider.release_job("job-g")  # and a second release finds nothing to do


def test_aws_gang_with_a_refused_node_terminates_the_started_ones(aws_provider: AWSProvider) -> None:
    from botocore.awsrequest import AWSResponse

    seen: list[Any] = []

    class _Raw:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **_: Any) -> Any:
            yield self.body

    def refuse_third(request: Any, **_: Any) -> Any:  # node 2 finds no capacity; nodes 0 and 1 started
        seen.append(request)
        if len(seen) == 3:
            body = (
                "<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>InsufficientInstanceCapacity"
                "</Code><Message>no p3 left</Message></Error></Errors><RequestID>r-1</RequestID></Response>"
            )
            return AWSResponse(request.url, 500, {"Content-Type": "text/xml"}, _Raw(body.encode()))
        return None

    hooks(aws_provider).register("before-send.ec2.RunInstances", refuse_third)
    gang = GangProvider(aws_provider, 3, start_timeout=30, poll_every=0.05)
    began = time.monotonic()
    with pytest.raises(NoCapacity):
        gang.launch(offer(), spot=True, boot=boot("job-r"), client_token="tok-r")
    assert time.monotonic() - began < 30
    found = _instances("job-r")
    assert len(found) == 2 and {i["State"]["Name"] for i in found} <= {"shutting-down", "terminated"}


# --------------------------------------------------------------------------- GCP (the fake GCE server)


def test_gcp_gang_nodes_share_one_compact_placement_policy(gce: FakeGCE) -> None:
    provider = make_gcp(gce)
    gang = GangProvider(provider, 2, start_timeout=30, poll_every=0.05)
    inst = gang.launch(gcp_offer(), spot=True, boot=gcp_boot("train-gang"), client_token="tok-gcp")
    assert len(gang.members(inst)) == 2
    policies = gce.requests_to("POST", r"/resourcePolicies$")
    assert len(policies) == 1
    placement = policies[0].body["groupPlacementPolicy"]
    assert placement == {"collocation": "COLLOCATED", "vmCount": 2}
    link = f"projects/{PROJECT}/regions/us-central1/resourcePolicies/spotrun-train-gang"
    assert [r.body["resourcePolicies"] for r in gce.requests_to("POST", r"/instances$")] == [[link], [link]]
    gang.terminate(inst)
    again = gang.launch(gcp_offer(), spot=True, boot=gcp_boot("train-gang", 2), client_token="tok-gcp2")
    assert len(gang.members(again)) == 2  # the policy made for attempt 1 serves the relaunch (409 taken)
    gang.terminate(again)
    gang.release_job("train-gang")  # the job's end: its placement policy goes too
    assert ("us-central1", "spotrun-train-gang") not in gce.policies
    assert gce.requests_to("DELETE", r"/resourcePolicies/spotrun-train-gang$")
    gang.release_job("train-gang")  # idempotent: nothing left to delete, no request
    assert len(gce.requests_to("DELETE", r"/resourcePolicies/")) == 1


def test_gcp_placement_policy_still_used_is_kept_and_the_end_does_not_fail(gce: FakeGCE) -> None:
    """A policy an instance still names cannot be deleted (Compute Engine answers 400
    resourceInUseByAnotherResource): the job's end logs it and goes on."""
    provider = make_gcp(gce)
    placed = provider.gang_placement(gcp_offer(), "busy", 1)
    provider.launch(gcp_offer(), spot=True, boot=gcp_boot("busy"), client_token="tb", placement=placed)
    provider.release_job("busy")
    assert ("us-central1", "spotrun-busy") in gce.policies


def test_gcp_fake_refuses_an_unknown_policy_and_a_full_one(gce: FakeGCE) -> None:
    provider = make_gcp(gce)
    with pytest.raises(ProviderError):
        nope = {"resource_policy": f"projects/{PROJECT}/regions/us-central1/resourcePolicies/nope"}
        provider.launch(gcp_offer(), spot=True, boot=gcp_boot("x"), client_token="t1", placement=nope)
    placed = provider.gang_placement(gcp_offer(), "solo", 1)
    provider.launch(gcp_offer(), spot=True, boot=gcp_boot("solo"), client_token="t2", placement=placed)
    with pytest.raises(ProviderError):
        provider.launch(gcp_offer(), spot=True, boot=gcp_boot("solo", 2), client_token="t3", placement=placed)


def test_gcp_gang_with_an_exhausted_zone_leaves_nothing(gce: FakeGCE) -> None:
    provider = make_gcp(gce)
    gang = GangProvider(provider, 3, start_timeout=30, poll_every=0.05)
    placed = provider.gang_placement(gcp_offer(), "train-full", 2)  # a policy made for 2 nodes
    assert placed
    with pytest.raises(ProviderError):
        gang.launch(gcp_offer(), spot=True, boot=gcp_boot("train-full"), client_token="tok-full")
    assert provider.list_owned("train-full") == []


# --------------------------------------------------------------------------- Azure (the fake ARM server)


def test_azure_gang_nodes_share_one_proximity_placement_group(arm: FakeARM) -> None:
    provider = make_azure(arm)
    gang = GangProvider(provider, 2, start_timeout=30, poll_every=0.05)
    inst = gang.launch(az_offer(zone="1"), spot=True, boot=az_boot("train-gang"), client_token="tok-az")
    assert len(gang.members(inst)) == 2
    groups = arm.requests_to("PUT", r"/proximityPlacementGroups/")
    assert groups and groups[0].body["properties"]["proximityPlacementGroupType"] == "Standard"
    assert groups[0].body["location"] == "eastus" and groups[0].body["zones"] == ["1"]
    vms = [r.body for r in arm.requests_to("PUT", r"/virtualMachines/")]
    ids = {vm["properties"]["proximityPlacementGroup"]["id"].lower() for vm in vms}
    assert len(vms) == 2 and len(ids) == 1 and ids.pop().endswith("/proximityplacementgroups/spotrun-train-gang")
    gang.terminate(inst)
    gang.release_job("train-gang")  # the job's end: its placement group goes too
    assert not [k for k in arm.resources if k.endswith("/proximityplacementgroups/spotrun-train-gang")]
    assert len(arm.requests_to("DELETE", r"/proximityPlacementGroups/")) == 1
    gang.release_job("train-gang")  # idempotent: nothing left to delete, no request
    assert len(arm.requests_to("DELETE", r"/proximityPlacementGroups/")) == 1


def test_azure_placement_group_still_used_is_kept_and_the_end_does_not_fail(arm: FakeARM) -> None:
    provider = make_azure(arm)
    placed = provider.gang_placement(az_offer(), "busy", 1)
    provider.launch(az_offer(), spot=True, boot=az_boot("busy"), client_token="tb", placement=placed)
    provider.release_job("busy")  # ARM refuses (a VM is in it): logged, the end goes on
    assert [k for k in arm.resources if k.endswith("/proximityplacementgroups/spotrun-busy")]


def test_azure_fake_refuses_a_vm_in_an_unknown_placement_group(arm: FakeARM) -> None:
    provider = make_azure(arm)
    bogus = {"proximity_placement_group": "/subscriptions/x/resourceGroups/y/providers/Microsoft.Compute/"
             "proximityPlacementGroups/nope"}  # fmt: skip
    with pytest.raises(ProviderError):
        provider.launch(az_offer(), spot=True, boot=az_boot("x"), client_token="t1", placement=bogus)


def test_azure_gang_with_a_refused_node_terminates_the_started_ones(arm: FakeARM) -> None:
    provider = make_azure(arm)
    gang = GangProvider(provider, 2, start_timeout=30, poll_every=0.05)
    provider.gang_placement(az_offer(), "train-r", 2)
    original = provider.launch
    calls: list[int] = []

    def second_refused(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            arm.fail_next_create("SkuNotAvailable", "no capacity for this size")
        return original(*args, **kw)

    provider.launch = second_refused  # type: ignore[method-assign]
    with pytest.raises(NoCapacity):
        gang.launch(az_offer(), spot=True, boot=az_boot("train-r"), client_token="tok-r")
    assert provider.list_owned("train-r") == []
