"""AWS egress: how an instance reaches S3 and the package index without any inbound port.

* The default VPC's default subnets give every instance a public IPv4 address and route 0.0.0.0/0
  to the VPC's internet gateway: nothing to add.
* A configured `subnet_id` is the user's: spotrun asks for a public IP on it
  (`AssociatePublicIpAddress` on the primary network interface) unless `subnet_nat: true` says
  the subnet reaches the internet through a NAT (then the instance gets a private address only).
* Inbound stays closed either way: the instance's only security group is `spotrun-no-ingress`.

`egress_missing` is `spotrun check`'s part (no launch): it reads the subnet's route table and says
what a VM would lack. A public IP costs $0.005/h (AWS public IPv4 pricing, since 2024-02), which
docs/providers/aws.md counts under "Costs".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spotrun.clouds.aws.provider import AWSProvider


def with_public_ip(request: dict[str, Any], *, subnet_id: str | None, configured: bool, nat: bool) -> dict[str, Any]:
    """The RunInstances request, with a public IP on a configured subnet that has no NAT.

    EC2 takes `AssociatePublicIpAddress` only inside a NetworkInterfaces entry, which must then
    carry the subnet and security groups itself (not the top-level SubnetId/SecurityGroupIds)."""
    if not configured or nat or not subnet_id:
        return request
    out = dict(request)
    groups = out.pop("SecurityGroupIds", [])
    out.pop("SubnetId", None)
    out["NetworkInterfaces"] = [
        {
            "DeviceIndex": 0,
            "SubnetId": subnet_id,
            "Groups": groups,
            "AssociatePublicIpAddress": True,
            "DeleteOnTermination": True,
        }
    ]
    return out


def _default_route(tables: list[dict[str, Any]]) -> dict[str, Any] | None:
    for table in tables:
        for route in table.get("Routes", []):
            if route.get("DestinationCidrBlock") == "0.0.0.0/0" and route.get("State", "active") == "active":
                return route
    return None


def _route_tables(provider: AWSProvider, ec2: Any, subnet: dict[str, Any]) -> list[dict[str, Any]]:
    """The subnet's route table: its explicit association, else its VPC's main table."""
    call = provider.api.call
    found = call(
        ec2.describe_route_tables, Filters=[{"Name": "association.subnet-id", "Values": [subnet["SubnetId"]]}]
    )["RouteTables"]
    if found:
        return list(found)
    return list(
        call(
            ec2.describe_route_tables,
            Filters=[{"Name": "vpc-id", "Values": [subnet["VpcId"]]}, {"Name": "association.main", "Values": ["true"]}],
        )["RouteTables"]
    )


def egress_missing(provider: AWSProvider) -> list[str]:
    """What a VM in the home region would lack to reach S3 and the package index (for `check`)."""
    from spotrun.clouds.base import ProviderError

    resources = provider.resources
    region = resources._home_region()
    if not region:
        return []  # no region to look in: check says so already
    ec2 = provider.api.client("ec2", region)
    try:
        if resources.subnet_id:
            subnets = provider.api.call(ec2.describe_subnets, SubnetIds=[resources.subnet_id])["Subnets"]
            where = f"subnet {resources.subnet_id}"
        else:
            vpcs = provider.api.call(ec2.describe_vpcs, Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
            if not vpcs:
                return [f"egress: {region} has no default VPC; set aws.subnet_id to a subnet with internet access"]
            subnets = provider.api.call(
                ec2.describe_subnets,
                Filters=[
                    {"Name": "vpc-id", "Values": [vpcs[0]["VpcId"]]},
                    {"Name": "default-for-az", "Values": ["true"]},
                ],
            )["Subnets"]
            where = f"the default VPC {vpcs[0]['VpcId']}"
        if not subnets:
            return [f"egress: {where} has no subnet in {region}"]
        route = _default_route(_route_tables(provider, ec2, subnets[0]))
    except ProviderError as exc:
        return [
            f"egress: cannot read the network of {region} ({exc}); spotrun needs ec2:DescribeSubnets/Vpcs/RouteTables"
        ]
    if resources.subnet_nat:
        if route is None or not (route.get("NatGatewayId") or route.get("InstanceId") or route.get("TransitGatewayId")):
            return [
                f"egress: {where} is configured as having a NAT (aws.subnet_nat) but its route table sends "
                "0.0.0.0/0 to no NAT gateway: add one, or drop subnet_nat so spotrun gives VMs a public IP"
            ]
        return []
    if route is None or not str(route.get("GatewayId", "")).startswith("igw-"):
        return [
            f"egress: {where} has no route 0.0.0.0/0 to an internet gateway, so a VM reaches neither S3 nor "
            "the package index: add one, or set aws.subnet_nat: true if the subnet routes through a NAT"
        ]
    return []
