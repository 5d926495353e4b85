"""Azure egress: a Standard public IP per VM behind an NSG that lets nothing in.

A VNet spotrun creates has no default outbound access, so a VM with only a private address
reaches neither the package index nor Blob storage. Two ways out were weighed:

* a NAT gateway on the spotrun subnet: about $0.045/h plus $0.045 per GB processed, and it is a
  standing resource per location that bills while no job runs (~$33/month) unless someone
  deletes it, shared by jobs whose lifetimes spotrun does not otherwise track;
* **a Standard public IP per VM (chosen)**: $0.005/h only while the VM exists (Azure IP address
  pricing, Standard static IPv4), created with the VM's NIC and deleted with it
  (`deleteOption: Delete`, and by spotrun's cleanup), nothing left standing. Standard public IPs
  are closed to inbound traffic unless an NSG allows it, and the NIC's NSG
  (`spotrun-nsg-<location>`) has no rule of spotrun's: Azure's default `DenyAllInBound` applies.

`azure.subnet_nat: true` says a configured `subnet_id` has a NAT gateway: then no public IP (and
`check` verifies the NAT gateway is attached). `egress_missing` is `spotrun check`'s part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spotrun.clouds.azure.provider import AzureProvider
    from spotrun.clouds.base import Boot


def public_ip_name(vm: str) -> str:
    return f"{vm}-ip"


def public_ip(provider: AzureProvider, vm: str, location: str, boot: Boot) -> str | None:
    """Create the VM's public IP (idempotent PUT); its id, or None when the subnet has a NAT."""
    if provider.subnet_id and provider.subnet_nat:
        return None
    from spotrun.clouds.azure.provider import TAG_ATTEMPT, TAG_JOB, _wire

    body = {
        "location": location,
        "sku": {"name": "Standard", "tier": "Regional"},
        "tags": {TAG_JOB: boot.job_id, TAG_ATTEMPT: str(boot.attempt)},
        "properties": {
            "publicIPAllocationMethod": "Static",
            "publicIPAddressVersion": "IPv4",
            "deleteOption": "Delete",  # goes with the VM (an eviction deletes the VM and its NIC)
        },
    }
    net = provider.network
    created = provider._call(
        lambda: net.public_ip_addresses.begin_create_or_update(
            provider.resource_group, public_ip_name(vm), body
        ).result()
    )
    return str(_wire(created)["id"])


def ensure_nsg(provider: AzureProvider, location: str) -> str:
    """The location's NSG without rules (Azure's defaults deny all inbound from the internet), for
    a NIC on a configured subnet; spotrun's own VNet gets it from `_ensure_network`."""
    from spotrun.clouds.azure.provider import _wire

    rg, net, name = provider.resource_group, provider.network, f"spotrun-nsg-{location}"
    nsg = provider._get(lambda: net.network_security_groups.get(rg, name))
    if nsg is None:
        body = {"location": location, "tags": {"spotrun": "network"}, "properties": {"securityRules": []}}
        nsg = provider._call(lambda: net.network_security_groups.begin_create_or_update(rg, name, body).result())
    return str(_wire(nsg)["id"])


def delete_public_ip(provider: AzureProvider, vm: str) -> None:
    """Delete the VM's public IP if it is still there (after its NIC: Azure refuses an IP in use)."""
    from azure.core.exceptions import ResourceNotFoundError

    from spotrun.clouds.base import ProviderError

    rg, net = provider.resource_group, provider.network
    try:
        provider._call(lambda: net.public_ip_addresses.begin_delete(rg, public_ip_name(vm)).result())
    except ProviderError as e:
        if not isinstance(e.__cause__, ResourceNotFoundError):
            raise


def _subnet_parts(subnet_id: str) -> tuple[str, str, str] | None:
    """(resource group, VNet, subnet) of a subnet resource id."""
    parts = subnet_id.strip("/").split("/")
    low = [p.lower() for p in parts]
    try:
        rg = parts[low.index("resourcegroups") + 1]
        vnet = parts[low.index("virtualnetworks") + 1]
        subnet = parts[low.index("subnets") + 1]
    except (ValueError, IndexError):
        return None
    return rg, vnet, subnet


def egress_missing(provider: AzureProvider) -> list[str]:
    """What a VM would lack to reach Blob storage and the package index (for `check`)."""
    from spotrun.clouds.azure.provider import _wire
    from spotrun.clouds.base import ProviderError

    if not provider.subnet_id:
        return []  # spotrun's own VNet: each VM gets a public IP behind the deny-all NSG
    parts = _subnet_parts(provider.subnet_id)
    if parts is None:
        return [f"egress: subnet_id {provider.subnet_id!r} is not a subnet resource id"]
    rg, vnet, name = parts
    try:
        found = provider._get(lambda: provider.network.subnets.get(rg, vnet, name))
    except ProviderError as exc:
        return [f"egress: cannot read subnet {provider.subnet_id} ({exc})"]
    if found is None:
        return [f"egress: subnet {provider.subnet_id} does not exist"]
    if provider.subnet_nat and not (_wire(found).get("properties") or {}).get("natGateway"):
        return [
            f"egress: azure.subnet_nat is set but subnet {name} has no NAT gateway: attach one, or drop "
            "subnet_nat so spotrun gives each VM a public IP (inbound denied by its NSG)"
        ]
    return []
