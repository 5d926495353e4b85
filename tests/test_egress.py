"""Egress that works by default and never opens an inbound port, per cloud; `check` names what a
VM would lack. AWS against moto (real boto3), GCP and Azure against the fakes in tests/fakes."""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest

from spotrun.catalog.model import Offer
from spotrun.clock import FakeClock
from spotrun.clouds.aws.provider import AWSProvider
from spotrun.clouds.base import Boot
from tests.fakes.moto_server import (  # noqa: F401  (aws, moto_server: fixtures)
    MotoServer,
    aws,
    fast_session,
    moto_server,
)

REGION = "us-east-1"


# ------------------------------------------------------------------------------------------- AWS


def _aws_offer() -> Offer:
    return Offer("aws", REGION, "us-east-1a", "g4dn.xlarge", "T4", 1, 16, 4, 16, 0.2, 0.52, 0.05)


def _boot(job: str = "egress-1") -> Boot:
    return Boot(job_id=job, attempt=1, store_url="s3://egress-bucket/p", job_prefix=f"jobs/{job}")


def _subnet(session: Any, *, internet: str) -> tuple[Any, str]:
    """A new VPC with one subnet in us-east-1a whose route table sends 0.0.0.0/0 to `internet`:
    "igw" (an internet gateway), "nat" (a NAT gateway) or "none"."""
    ec2 = session.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    if internet == "igw":
        igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
        ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    elif internet == "nat":
        alloc = ec2.allocate_address(Domain="vpc")["AllocationId"]
        nat = ec2.create_nat_gateway(SubnetId=subnet, AllocationId=alloc)["NatGateway"]["NatGatewayId"]
        ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat)
    return ec2, subnet


def _sent(provider: AWSProvider) -> list[dict[str, str]]:
    sent: list[dict[str, str]] = []

    def capture(request: Any, **_: Any) -> None:
        body = request.body.decode() if isinstance(request.body, bytes) else request.body
        sent.append(dict(urllib.parse.parse_qsl(body)))

    provider.api.client("ec2", REGION).meta.events.register("before-send.ec2.RunInstances", capture)
    return sent


def test_aws_configured_subnet_gets_a_public_ip_and_no_inbound_rule(aws: MotoServer) -> None:  # noqa: F811
    session = fast_session(REGION)
    ec2, subnet = _subnet(session, internet="igw")
    provider = AWSProvider(region=REGION, subnet_id=subnet, session=session, clock=FakeClock(), regions=[REGION])
    sent = _sent(provider)
    inst = provider.launch(_aws_offer(), spot=True, boot=_boot(), client_token="eg-1")
    params = sent[-1]
    assert params["NetworkInterface.1.AssociatePublicIpAddress"] == "true"
    assert params["NetworkInterface.1.SubnetId"] == subnet and params["NetworkInterface.1.DeviceIndex"] == "0"
    assert "SubnetId" not in params and not any(k.startswith("SecurityGroupId") for k in params)
    group = params["NetworkInterface.1.SecurityGroupId.1"]
    described = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]
    assert described["GroupName"] == "spotrun-no-ingress" and described["IpPermissions"] == []
    found = ec2.describe_instances(InstanceIds=[inst.instance_id])["Reservations"][0]["Instances"][0]
    assert found["SubnetId"] == subnet and found.get("PublicIpAddress")
    assert provider.check()["missing"] == []


def test_aws_subnet_with_nat_gets_no_public_ip(aws: MotoServer) -> None:  # noqa: F811
    session = fast_session(REGION)
    _, subnet = _subnet(session, internet="nat")
    provider = AWSProvider(
        region=REGION, subnet_id=subnet, subnet_nat=True, session=session, clock=FakeClock(), regions=[REGION]
    )
    sent = _sent(provider)
    provider.launch(_aws_offer(), spot=True, boot=_boot(), client_token="eg-2")
    assert sent[-1]["SubnetId"] == subnet and not any(k.startswith("NetworkInterface") for k in sent[-1])
    assert provider.check()["missing"] == []


@pytest.mark.parametrize(
    ("internet", "nat", "words"),
    [("none", False, "no route 0.0.0.0/0 to an internet gateway"), ("igw", True, "to no NAT gateway")],
)
def test_aws_check_names_missing_egress(aws: MotoServer, internet: str, nat: bool, words: str) -> None:  # noqa: F811
    session = fast_session(REGION)
    _, subnet = _subnet(session, internet=internet)
    provider = AWSProvider(region=REGION, subnet_id=subnet, subnet_nat=nat, session=session, clock=FakeClock())
    result = provider.check()
    assert result["usable"] is False
    assert len(result["missing"]) == 1 and subnet in result["missing"][0] and words in result["missing"][0]
    assert words in result["detail"]
