"""Gang launch on the cloud fakes: the placement setting reaches the cloud's request, and a node
the cloud refuses makes the launch all or nothing (the nodes already started are terminated
within the gang's bound). AWS: real boto3 against moto's server."""

from __future__ import annotations

import time
from typing import Any

import pytest

from spotrun.clouds.aws.provider import TAG_JOB, AWSProvider
from spotrun.clouds.base import InstanceStatus, NoCapacity
from spotrun.control.gang import GangProvider
from tests.fakes.aws_placement import serve_placement_groups
from tests.fakes.moto_server import MotoServer, aws, fast_session, moto_server  # noqa: F401
from tests.test_aws_provider import BUCKET, REGION, Recorder, boot, hooks, offer, s3


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
