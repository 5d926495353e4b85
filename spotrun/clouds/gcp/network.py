"""GCP egress: an ephemeral external IP per VM, and no inbound port.

A VM without an external IP reaches neither PyPI nor, without Private Google Access, the bucket;
Cloud NAT is a per-region router the user must own. So by default each VM gets an **ephemeral
external IP** (`ONE_TO_ONE_NAT` access config: released with the VM, $0.0025/h on a Spot VM per
cloud.google.com/vpc/network-pricing) and the network tag `spotrun-no-ingress`, and spotrun keeps
one firewall rule per network, `spotrun-deny-ingress-<network>`: INGRESS, priority 0 (above any
other rule, the default network's `default-allow-ssh` included), deny all protocols from
0.0.0.0/0 to that tag. `gcp.cloud_nat: true` says the network has Cloud NAT: then no external IP
(and `check` verifies the NAT exists).

`egress_missing` is `spotrun check`'s part: it reads the firewalls (and routers, with cloud_nat).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spotrun.clouds.gcp.provider import GCPProvider

NO_INGRESS_TAG = "spotrun-no-ingress"
ACCESS_CONFIG_NAME = "External NAT"


def network_name(network: str | None) -> str:
    """`default`, `my-net`, `global/networks/my-net` or a URL -> the network's name."""
    return (network or "default").rstrip("/").rsplit("/", 1)[-1]


def firewall_name(network: str | None) -> str:
    return f"spotrun-deny-ingress-{network_name(network)}"[:63].rstrip("-")


def external_ip(provider: GCPProvider) -> bool:
    return not provider.cloud_nat


def shape_nic(provider: GCPProvider, instance: Any) -> None:
    """Give the VM's first NIC an ephemeral external IP and the VM the deny-ingress tag (unless
    the network has Cloud NAT)."""
    from google.cloud import compute_v1

    if not external_ip(provider):
        return
    nic = instance.network_interfaces[0]  # proto-plus: a view on the instance's own message
    nic.access_configs = [compute_v1.AccessConfig(name=ACCESS_CONFIG_NAME, type_="ONE_TO_ONE_NAT")]
    instance.tags = compute_v1.Tags(items=[NO_INGRESS_TAG])


def deny_ingress_rule(network: str | None) -> dict[str, Any]:
    """The firewall rule, as the API's JSON."""
    return {
        "name": firewall_name(network),
        "network": f"global/networks/{network_name(network)}",
        "direction": "INGRESS",
        "priority": 0,
        "denied": [{"IPProtocol": "all"}],
        "sourceRanges": ["0.0.0.0/0"],
        "targetTags": [NO_INGRESS_TAG],
        "description": "spotrun: nothing reaches its VMs from outside (they get an external IP for egress)",
    }


def ensure_deny_ingress(provider: GCPProvider) -> None:
    """Create the network's deny-ingress rule once (found by name); before any VM gets an external
    IP. Idempotent: a rule another launch just created is fine (409)."""
    if not external_ip(provider):
        return
    name = firewall_name(provider.network)
    done = provider.__dict__.setdefault("_deny_ingress_ok", set())
    if name in done:
        return
    from google.cloud import compute_v1

    from spotrun.clouds.base import BadRequest, ProviderError

    client = provider._client("firewalls")
    try:
        provider._call(lambda: client.get(project=provider.project, firewall=name))
    except BadRequest:  # not found: create it
        rule = deny_ingress_rule(provider.network)
        body = compute_v1.Firewall(
            name=rule["name"],
            network=rule["network"],
            direction=rule["direction"],
            priority=rule["priority"],
            denied=[compute_v1.Denied(I_p_protocol="all")],
            source_ranges=rule["sourceRanges"],
            target_tags=rule["targetTags"],
            description=rule["description"],
        )
        try:
            op = provider._call(lambda: client.insert(project=provider.project, firewall_resource=body))
            op.result(timeout=provider.operation_timeout)
        except ProviderError as exc:
            if "alreadyExists" not in str(exc) and "already exists" not in str(exc):
                raise
    done.add(name)


def _applies_to_all(rule: dict[str, Any]) -> bool:
    return not rule.get("targetTags") and not rule.get("targetServiceAccounts")


def egress_missing(provider: GCPProvider) -> list[str]:
    """What a VM on the configured network would lack to reach the bucket and the package index."""
    from google.protobuf.json_format import MessageToDict

    from spotrun.clouds.base import ProviderError

    net = network_name(provider.network)
    missing: list[str] = []
    try:
        client = provider._client("firewalls")
        rules = [MessageToDict(r._pb) for r in provider._call(lambda: list(client.list(project=provider.project)))]
    except ProviderError as exc:
        return [
            f"egress: cannot read the firewalls of project {provider.project} ({exc}); spotrun needs "
            "compute.firewalls.list, .get and .create for its deny-ingress rule"
        ]
    for rule in rules:
        if not str(rule.get("network", "")).endswith(f"/networks/{net}") or rule.get("disabled"):
            continue
        if rule.get("direction") == "EGRESS" and rule.get("denied") and _applies_to_all(rule):
            if "0.0.0.0/0" in rule.get("destinationRanges", []):
                missing.append(
                    f"egress: firewall rule {rule.get('name')} denies egress to 0.0.0.0/0 on network {net}: "
                    "VMs reach neither the bucket nor the package index"
                )
    if provider.cloud_nat:
        try:
            routers = provider._client("routers")
            scopes = provider._call(lambda: list(routers.aggregated_list(project=provider.project)))
        except ProviderError as exc:
            return [*missing, f"egress: cannot read the Cloud Routers ({exc}) to verify gcp.cloud_nat"]
        nats = [
            router
            for _scope, listing in scopes
            for router in listing.routers
            if router.network.endswith(f"/networks/{net}") and list(router.nats)
        ]
        if not nats:
            missing.append(
                f"egress: gcp.cloud_nat is set but network {net} has no Cloud NAT: create one on a Cloud "
                "Router in each region you launch in, or drop cloud_nat so VMs get an ephemeral external IP"
            )
    return missing
