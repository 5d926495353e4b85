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
from tests.fakes.azure_server import arm_fixture, arm_server_fixture  # noqa: F401  (fixtures)
from tests.fakes.gce_server import gce_fixture, gce_server_fixture  # noqa: F401  (fixtures)
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


def test_aws_default_vpc_without_an_internet_route_is_named(aws: MotoServer) -> None:  # noqa: F811
    session = fast_session(REGION)
    provider = AWSProvider(region=REGION, session=session, clock=FakeClock())
    assert provider.check()["missing"] == []  # the default VPC routes 0.0.0.0/0 to its gateway
    ec2 = session.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    table = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["RouteTables"][0]
    ec2.delete_route(RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0")
    result = provider.check()
    assert result["usable"] is False and vpc in result["missing"][0]


# ------------------------------------------------------------------------------------------- GCP


def _gcp(gce: Any, **kw: Any) -> Any:
    from tests.test_gcp_provider import make_provider

    return make_provider(gce, **kw)


def _gcp_offer() -> Offer:
    return Offer("gcp", "us-central1", "us-central1-a", "g2-standard-8", "L4", 1, 24, 8, 32, 0.3, 0.9, 0.1)


def test_gcp_vm_gets_an_external_ip_behind_a_deny_all_ingress_rule(gce: Any) -> None:
    provider = _gcp(gce)
    provider.launch(_gcp_offer(), spot=True, boot=_boot(), client_token="g-1")
    provider.launch(_gcp_offer(), spot=True, boot=_boot("egress-2"), client_token="g-2")
    (nic,) = gce.requests_to("POST", r"/instances$")[0].body["networkInterfaces"]
    assert nic["accessConfigs"] == [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]  # ephemeral: no natIP
    rule = gce.firewalls["spotrun-deny-ingress-default"]
    assert rule["direction"] == "INGRESS" and rule["priority"] == 0  # above default-allow-ssh (65534)
    assert rule["denied"] == [{"IPProtocol": "all"}] and rule["sourceRanges"] == ["0.0.0.0/0"]
    assert rule["targetTags"] == ["spotrun-no-ingress"] and "allowed" not in rule
    assert len(gce.requests_to("POST", r"/global/firewalls$")) == 1  # once per network
    # a fresh provider (a new controller) finds the rule by name and creates nothing
    _gcp(gce).launch(_gcp_offer(), spot=True, boot=_boot("egress-3"), client_token="g-3")
    assert len(gce.requests_to("POST", r"/global/firewalls$")) == 1
    assert provider.check()["missing"] == []


def test_gcp_cloud_nat_means_no_external_ip_and_check_verifies_the_nat(gce: Any) -> None:
    provider = _gcp(gce, cloud_nat=True)
    result = provider.check()
    assert result["usable"] is False and "no Cloud NAT" in result["missing"][0]
    gce.add_router("us-central1", "default", [{"name": "nat-1", "natIpAllocateOption": "AUTO_ONLY"}])
    assert provider.check()["missing"] == [] and provider.check()["usable"] is True
    provider.launch(_gcp_offer(), spot=True, boot=_boot(), client_token="g-4")
    (nic,) = gce.requests_to("POST", r"/instances$")[-1].body["networkInterfaces"]
    assert "accessConfigs" not in nic and not gce.requests_to("POST", r"/global/firewalls$")


def test_gcp_check_names_an_egress_deny_rule(gce: Any) -> None:
    gce.firewalls["block-out"] = {
        "name": "block-out", "direction": "EGRESS", "priority": 100, "denied": [{"IPProtocol": "all"}],
        "destinationRanges": ["0.0.0.0/0"], "network": gce._link("global", "networks", "default"),
    }  # fmt: skip
    result = _gcp(gce).check()
    assert result["usable"] is False and result["missing"] == [
        "egress: firewall rule block-out denies egress to 0.0.0.0/0 on network default: VMs reach neither "
        "the bucket nor the package index"
    ]


def test_gce_fake_refuses_a_firewall_the_real_api_refuses(gce: Any) -> None:
    from google.api_core import exceptions as gexc
    from google.cloud import compute_v1

    from tests.fakes.gce_server import PROJECT, gce_credentials

    client = compute_v1.FirewallsClient(credentials=gce_credentials(), client_options={"api_endpoint": gce.url})
    both = compute_v1.Firewall(
        name="x-both", direction="INGRESS", source_ranges=["0.0.0.0/0"],
        allowed=[compute_v1.Allowed(I_p_protocol="tcp")], denied=[compute_v1.Denied(I_p_protocol="all")],
    )  # fmt: skip
    with pytest.raises(gexc.BadRequest, match="Exactly one of"):
        client.insert(project=PROJECT, firewall_resource=both)
    no_source = compute_v1.Firewall(name="x-open", direction="INGRESS", denied=[compute_v1.Denied(I_p_protocol="all")])
    with pytest.raises(gexc.BadRequest, match="sourceRanges"):
        client.insert(project=PROJECT, firewall_resource=no_source)
    with pytest.raises(gexc.BadRequest, match="resource.name"):
        client.insert(
            project=PROJECT, firewall_resource=compute_v1.Firewall(name="Bad_Name", source_ranges=["0.0.0.0/0"])
        )


# ----------------------------------------------------------------------------------------- Azure


def _azure(arm: Any, **kw: Any) -> Any:
    from tests.test_azure_provider import make_provider

    return make_provider(arm, **kw)


def _azure_offer() -> Offer:
    return Offer("azure", "eastus", "", "Standard_NC4as_T4_v3", "T4", 1, 16.0, 4, 28, 0.16, 0.53, 0.1)


def test_azure_vm_gets_a_standard_public_ip_behind_an_nsg_without_rules(arm: Any) -> None:
    provider = _azure(arm)
    inst = provider.launch(_azure_offer(), spot=True, boot=_boot(), client_token="a-1")
    (pip,) = arm.of_kind("pip")
    assert pip["sku"]["name"] == "Standard" and pip["properties"]["publicIPAllocationMethod"] == "Static"
    assert pip["properties"]["deleteOption"] == "Delete"  # an evicted VM takes its NIC and IP along
    (nic,) = arm.of_kind("nic")
    (cfg,) = nic["properties"]["ipConfigurations"]
    assert cfg["properties"]["publicIPAddress"]["id"] == pip["id"]
    (nsg,) = arm.of_kind("nsg")
    assert nic["properties"]["networkSecurityGroup"]["id"] == nsg["id"] and nsg["properties"]["securityRules"] == []
    provider.terminate(inst)
    assert arm.of_kind("pip") == [] and arm.of_kind("nic") == []  # nothing left billing
    assert provider.check()["missing"] == []


def test_azure_eviction_takes_the_public_ip_along(arm: Any) -> None:
    provider = _azure(arm)
    inst = provider.launch(_azure_offer(), spot=True, boot=_boot(), client_token="a-2")
    arm.preempt(inst.instance_id)
    arm.reclaim(inst.instance_id)  # evictionPolicy Delete: the VM, its NIC and (deleteOption) its IP
    assert arm.vm(inst.instance_id) is None and arm.of_kind("nic") == [] and arm.of_kind("pip") == []


def _configured_subnet(arm: Any) -> str:
    """A subnet of a VNet that exists (spotrun's own, made by a first launch) as a user's subnet."""
    first = _azure(arm)
    first.launch(_azure_offer(), spot=True, boot=_boot("setup"), client_token="a-setup")
    (vnet,) = arm.of_kind("vnet")
    return vnet["properties"]["subnets"][0]["id"]


def test_azure_subnet_with_nat_gets_no_public_ip_and_check_verifies_the_nat(arm: Any) -> None:
    subnet = _configured_subnet(arm)
    before = len(arm.of_kind("pip"))
    provider = _azure(arm, subnet_id=subnet, subnet_nat=True)
    result = provider.check()
    assert result["usable"] is False and "has no NAT gateway" in result["missing"][0]
    with arm.lock:
        (vnet,) = arm._of_kind("vnet")
        vnet["properties"]["subnets"][0]["properties"]["natGateway"] = {"id": "/subscriptions/x/natGateways/nat-1"}
    assert provider.check()["missing"] == []
    provider.launch(_azure_offer(), spot=True, boot=_boot(), client_token="a-3")
    assert len(arm.of_kind("pip")) == before  # no new public IP
    nics = [n for n in arm.of_kind("nic") if n["tags"]["spotrun-job"] == "egress-1"]
    assert "publicIPAddress" not in nics[0]["properties"]["ipConfigurations"][0]["properties"]
    assert nics[0]["properties"]["networkSecurityGroup"]["id"].endswith("spotrun-nsg-eastus")


def test_azure_check_names_a_missing_subnet(arm: Any) -> None:
    rg = "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/spotrun-test"
    result = _azure(arm, subnet_id=f"{rg}/providers/Microsoft.Network/virtualNetworks/nope/subnets/default").check()
    assert result["usable"] is False and "does not exist" in result["missing"][0]


def test_azure_fake_refuses_what_arm_refuses_for_public_ips(arm: Any) -> None:
    provider = _azure(arm)
    provider.launch(_azure_offer(), spot=True, boot=_boot(), client_token="a-4")
    (pip,) = arm.of_kind("pip")
    net = provider.network
    from spotrun.clouds.base import BadRequest, ProviderError

    dynamic = {"location": "eastus", "sku": {"name": "Standard"}, "properties": {"publicIPAllocationMethod": "Dynamic"}}
    with pytest.raises(ProviderError, match="StandardSkuPublicIPAddressesMustBeStatic"):
        provider._call(lambda: net.public_ip_addresses.begin_create_or_update("spotrun-test", "x-ip", dynamic).result())
    with pytest.raises(ProviderError, match="in use"):
        provider._call(lambda: net.public_ip_addresses.begin_delete("spotrun-test", pip["name"]).result())
    (vnet,) = arm.of_kind("vnet")
    nic = {
        "location": "eastus",
        "properties": {"ipConfigurations": [{"name": "c", "properties": {
            "subnet": {"id": vnet["properties"]["subnets"][0]["id"]}, "publicIPAddress": {"id": pip["id"]}}}]},
    }  # fmt: skip
    with pytest.raises(BadRequest, match="PublicIPAddressInUse"):
        provider._call(lambda: net.network_interfaces.begin_create_or_update("spotrun-test", "other-nic", nic).result())


# ----------------------------------------------------------------------------------- spotrun check


def test_spotrun_check_names_missing_egress_and_exits_2(aws: MotoServer) -> None:  # noqa: F811
    import json
    import os
    import subprocess
    import sys

    def check() -> tuple[int, dict[str, Any]]:
        done = subprocess.run(
            [sys.executable, "-m", "spotrun", "check", "-p", "aws", "--json"],
            capture_output=True, text=True, env=dict(os.environ), timeout=120,
        )  # fmt: skip
        return done.returncode, json.loads(done.stdout)

    code, out = check()
    assert code == 0 and out["providers"][0]["missing"] == [], out
    ec2 = fast_session(REGION).client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    table = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["RouteTables"][0]
    ec2.delete_route(RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0")
    code, out = check()
    (row,) = out["providers"]
    assert code == 2 and row["usable"] is False
    assert row["missing"] == [
        f"egress: the default VPC {vpc} has no route 0.0.0.0/0 to an internet gateway, so a VM reaches neither "
        "S3 nor the package index: add one, or set aws.subnet_nat: true if the subnet routes through a NAT"
    ]


def test_the_spec_says_a_network_has_nat(tmp_path: Any) -> None:
    from spotrun.clouds.azure.provider import AzureProvider
    from spotrun.clouds.gcp.provider import GCPProvider
    from spotrun.spec import load_spec

    path = tmp_path / "job.yaml"
    path.write_text(
        "name: nat\nrun: python train.py\naws:\n  subnet_id: subnet-1\n  subnet_nat: true\n"
        "gcp:\n  cloud_nat: true\nazure:\n  subnet_nat: true\n"
    )
    spec = load_spec(path)
    aws_options = AWSProvider.options_from_spec(spec)
    assert aws_options["subnet_nat"] is True and AWSProvider(**aws_options).resources.subnet_nat is True
    assert GCPProvider(**GCPProvider.options_from_spec(spec)).cloud_nat is True
    assert AzureProvider(**AzureProvider.options_from_spec(spec)).subnet_nat is True
