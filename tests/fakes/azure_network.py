"""What the Azure fake (tests/fakes/azure_server.py) needs for spotrun's egress
(spotrun/clouds/azure/network.py), as ARM behaves:

* public IP addresses (`Microsoft.Network/publicIPAddresses`, kind "pip"): a Standard SKU IP must
  be Static (400 `StandardSkuPublicIPAddressesMustBeStatic`); a NIC may reference only an
  existing IP (400 `InvalidResourceReference`) that no other NIC uses (400
  `PublicIPAddressInUse`); an IP a NIC still uses cannot be deleted (400); an IP with
  `deleteOption: Delete` goes when the VM deleting its NIC goes;
* subnets: GET `.../virtualNetworks/<vnet>/subnets/<subnet>` answers from the stored VNet
  (a test may put `natGateway` into a subnet's properties).
"""

from __future__ import annotations

from typing import Any

from tests.fakes.rest_fake import Request, Response


def _error(status: int, code: str, message: str) -> Response:
    return Response(status, {"error": {"code": code, "message": message}})


def check_public_ip(resource: dict[str, Any]) -> Response | None:
    sku = (resource.get("sku") or {}).get("name", "Basic")
    method = resource.get("properties", {}).get("publicIPAllocationMethod", "Dynamic")
    if sku == "Standard" and method != "Static":
        return _error(400, "StandardSkuPublicIPAddressesMustBeStatic", "Standard sku publicIp must be Static.")
    resource["properties"]["ipAddress"] = f"20.0.0.{len(resource['name']) % 250 + 1}"
    return None


def attached_nic(fake: Any, pip_id: str) -> str | None:
    """The id of the NIC that uses the public IP `pip_id` (lower-case), if any."""
    for key, res in fake.resources.items():
        if res.get("_kind") != "nic":
            continue
        for cfg in res.get("properties", {}).get("ipConfigurations", []):
            ref = (cfg.get("properties", {}).get("publicIPAddress") or {}).get("id", "")
            if ref.lower() == pip_id:
                return key
    return None


def check_nic_public_ip(fake: Any, config: dict[str, Any], nic_id: str) -> Response | None:
    ref = (config.get("publicIPAddress") or {}).get("id")
    if not ref:
        return None
    if ref.lower() not in fake.resources:
        return _error(400, "InvalidResourceReference", f"Resource {ref} referenced by resource {nic_id} was not found.")
    user = attached_nic(fake, ref.lower())
    if user is not None and user != nic_id.lower():
        return _error(400, "PublicIPAddressInUse", f"Public IP address {ref} is already used by {user}.")
    return None


def delete_with_nic(fake: Any, nic: dict[str, Any]) -> None:
    """The NIC went with its VM: so does each public IP of it created with deleteOption Delete."""
    for cfg in nic.get("properties", {}).get("ipConfigurations", []):
        ref = (cfg.get("properties", {}).get("publicIPAddress") or {}).get("id", "").lower()
        pip = fake.resources.get(ref)
        if pip is not None and pip.get("properties", {}).get("deleteOption") == "Delete":
            fake.resources.pop(ref, None)


def install(fake: Any) -> None:
    from tests.fakes.azure_server import RG

    def subnet_get(req: Request) -> Response:
        denied = fake._guard(req)
        if denied:
            return denied
        vnet_id = (
            f"/subscriptions/{req.params['sub']}/resourceGroups/{req.params['rg']}/providers/"
            f"Microsoft.Network/virtualNetworks/{req.params['vnet']}"
        ).lower()
        with fake.lock:
            vnet = fake.resources.get(vnet_id)
            for sub in (vnet or {}).get("properties", {}).get("subnets", []):
                if sub["name"].lower() == req.params["subnet"].lower():
                    return Response(200, sub)
        return _error(404, "NotFound", f"Resource {vnet_id}/subnets/{req.params['subnet']} not found.")

    fake.route(
        "GET",
        RG + r"/providers/Microsoft\.Network/virtualNetworks/(?P<vnet>[^/]+)/subnets/(?P<subnet>[^/]+)",
        subnet_get,
    )
