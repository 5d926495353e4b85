"""A local fake of Azure Resource Manager (the subset spotrun's Azure provider uses).

The real `azure-mgmt-compute` / `azure-mgmt-network` clients talk to it over HTTP (`base_url=url`):

    Microsoft.Compute: virtualMachines PUT/GET(?$expand=instanceView)/DELETE/list, skus list,
                       async operations;
    Microsoft.Network: virtualNetworks, networkSecurityGroups, networkInterfaces, publicIPAddresses
                       PUT/GET/DELETE, subnets GET (tests/fakes/azure_network.py), async operations;
    Microsoft.ManagedIdentity identities and Microsoft.Authorization role assignments on storage
                       scopes (tests/fakes/azure_identity_fake.py).

Modelled on ARM's behaviour where the provider depends on it:

* PUT/DELETE are long-running: 201/202 with an `Azure-AsyncOperation` header, `InProgress` for
  `op_polls` polls, then `Succeeded` or `Failed` with `error.code`.
* `fail_next_create(code, async_=...)`: a synchronous 409 (as ARM answers SkuNotAvailable or a
  quota error) or an asynchronous failure (AllocationFailed ...) that, like Azure, leaves the VM
  behind in provisioning state `Failed`, its NIC still attached.
* deleting a VM deletes the NIC and disk whose `deleteOption` is `Delete`; a NIC attached to a
  VM cannot be deleted (`NicInUse`).
* per-VM Scheduled Events under `/_vm/<name>/metadata/scheduledevents` (needs `Metadata: true`).
  `preempt(name)` posts a `Preempt` event with NotBefore = now + 30 s; approving it (POST
  StartRequests) or `reclaim(name)` evicts the VM: with evictionPolicy Delete it is deleted.
* a bearer token other than `ARM_TOKEN` gets 401 InvalidAuthenticationToken.
"""

from __future__ import annotations

import base64
import binascii
import copy
import itertools
import re
import threading
import time
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import pytest

from spotrun.clouds.base import Boot, extract_boot
from tests.fakes import azure_identity_fake, azure_network
from tests.fakes.rest_fake import Request, Response, RestFake

SUBSCRIPTION = "00000000-0000-4000-8000-000000000001"
RESOURCE_GROUP = "spotrun-test"
ARM_TOKEN = "arm-test-token"
LOCATIONS = ("eastus", "westus2", "westeurope")
SKUS = ("Standard_NC4as_T4_v3", "Standard_NC6s_v3", "Standard_NC24ads_A100_v4", "Standard_D2s_v3")
S = r"/subscriptions/(?P<sub>[^/]+)"
RG = S + r"/resource[gG]roups/(?P<rg>[^/]+)"
KINDS = {
    "Microsoft.Compute/virtualMachines": "vm",
    "Microsoft.Compute/proximityPlacementGroups": "ppg",
    "Microsoft.Network/virtualNetworks": "vnet",
    "Microsoft.Network/networkSecurityGroups": "nsg",
    "Microsoft.Network/networkInterfaces": "nic",
    "Microsoft.Network/publicIPAddresses": "pip",
}


IMAGES = (  # marketplace images the fake knows (publisher, offer, sku); any version
    ("microsoft-dsvm", "ubuntu-hpc", "2204"),
    ("microsoft-dsvm", "ubuntu-hpc", "2004"),
    ("canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2"),
    ("canonical", "ubuntu-24_04-lts", "server"),
)
IDENTITIES = ("spotrun-runner",)
IDENTITY_RX = re.compile(
    r"^/subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft\.managedidentity/userassignedidentities/[^/]+$",
    re.IGNORECASE,
)


def _error(status: int, code: str, message: str, target: str = "") -> Response:
    err = {"code": code, "message": message}
    if target:
        err["target"] = target
    return Response(status, {"error": err})


def _catalog_sizes() -> set[str]:
    from spotrun.catalog import bundled_offers

    return {o.instance_type for o in bundled_offers() if o.provider == "azure"}


def _model_class(typ: Any) -> Any:
    """The SDK model class a (nested functools.partial) field deserializer builds, if any."""
    import functools

    from azure.mgmt.compute._utils.model_base import Model

    if isinstance(typ, type) and issubclass(typ, Model):
        return typ
    if isinstance(typ, functools.partial):
        for arg in (typ.func, *typ.args):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


def unknown_member(model: Any, data: Any, path: str = "") -> str | None:
    """The first JSON member azure-mgmt-compute's model `model` does not define (ARM refuses it
    with InvalidRequestContent), walking nested models and lists of models."""
    if not isinstance(data, dict):
        return None
    fields = {f._rest_name: f for f in model()._attr_to_rest_field.values()}  # noqa: SLF001 - the SDK's schema
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            return f"Could not find member '{key}' on object of type '{model.__name__}'. Path '{path}{key}'."
        sub = _model_class(field._type)  # noqa: SLF001
        if sub is None:
            continue
        if "_deserialize_dict" in repr(field._type):  # noqa: SLF001 - a map: its keys are names, not members
            value = list(value.values()) if isinstance(value, dict) else value
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            where = f"{path}{key}[{i}]." if isinstance(value, list) else f"{path}{key}."
            found = unknown_member(sub, item, where)
            if found:
                return found
    return None


class FakeARM(RestFake):
    def __init__(
        self,
        *,
        subscription: str = SUBSCRIPTION,
        resource_groups: tuple[str, ...] = (RESOURCE_GROUP,),
        op_polls: int = 2,
        notice_seconds: float = 30.0,
    ) -> None:
        super().__init__()
        self.subscription = subscription
        self.resource_groups = {g.lower() for g in resource_groups}
        self.op_polls = op_polls
        self.notice_seconds = notice_seconds
        self.token = ARM_TOKEN
        self.resources: dict[str, dict[str, Any]] = {}  # lower-case id -> resource JSON
        self.operations: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}  # VM name -> scheduled events
        self.acknowledged: list[str] = []  # EventIds approved through StartRequests
        self.evicted: list[str] = []
        self.restricted: dict[tuple[str, str], str] = {}  # (location, size) -> reason code
        self.zone_restricted: dict[tuple[str, str], set[str]] = {}  # (location, size) -> zones not offered
        self.sizes = set(SKUS) | _catalog_sizes()
        self.identities = set(IDENTITIES)  # user-assigned identity names in the resource groups
        # (resource id, the GET request or None) -> Response | None: identities other fakes hold
        self.identity_sources: list[Any] = []
        self.images = set(IMAGES)
        self._incarnation = itertools.count(1)
        self._fail_next: list[dict[str, Any]] = []
        self._throttle = 0
        self._timers: list[threading.Timer] = []
        r = self.route
        prov = r"/providers/(?P<ns>Microsoft\.(?:Compute|Network))/(?P<type>[A-Za-z]+)"
        r("PUT", RG + prov + r"/(?P<name>[^/]+)", self._put)
        r("GET", RG + prov + r"/(?P<name>[^/]+)", self._get)
        r("DELETE", RG + prov + r"/(?P<name>[^/]+)", self._delete)
        r("GET", RG + prov, self._list)
        azure_network.install(self)  # subnets GET (tests/fakes/azure_network.py)
        r("GET", S + r"/providers/Microsoft\.Compute/virtualMachines", self._list_all)
        r("GET", S + r"/providers/Microsoft\.Compute/skus", self._skus)
        r(
            "GET",
            S + r"/providers/Microsoft\.(?:Compute|Network)/locations/[^/]+/operations/(?P<op>[^/]+)",
            self._operation,
        )
        r(
            "GET",
            RG + r"/providers/Microsoft\.ManagedIdentity/userAssignedIdentities/(?P<identity>[^/]+)",
            self._identity_get,
        )
        azure_identity_fake.install(self)  # per-job identities, storage role assignments
        r("GET", r"/_vm/(?P<vm>[^/]+)/metadata/scheduledevents", self._events_get)
        r("POST", r"/_vm/(?P<vm>[^/]+)/metadata/scheduledevents", self._events_post)

    # ------------------------------------------------------------------ test hooks

    @property
    def metadata_endpoint(self) -> str:
        """For `AzureProvider(imds_endpoint=...)`: each VM gets its own Scheduled Events path."""
        return f"{self.url}/_vm/{{instance}}"

    def fail_next_create(self, code: str, message: str = "", *, async_: bool = False, status: int = 409) -> None:
        self._fail_next.append(
            {"code": code, "message": message or f"fake failure {code}", "async": async_, "status": status}
        )

    def restrict_sku(self, location: str, size: str, reason: str = "NotAvailableForSubscription") -> None:
        self.restricted[(location, size)] = reason

    def restrict_zones(self, location: str, size: str, zones: set[str]) -> None:
        """`size` is not offered in these zones of `location` (a `Zone` restriction in the SKU list)."""
        self.zone_restricted[(location, size)] = set(zones)

    def throttle_next(self, n: int) -> None:
        self._throttle = n

    def vm(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            return next((v for v in self._of_kind("vm") if v["name"] == name), None)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self._of_kind(kind))

    def running_boots(self) -> dict[str, Boot]:
        """Each running VM's boot record, read back from its custom data."""
        out = {}
        with self.lock:
            for vm in self._of_kind("vm"):
                props = vm["properties"]
                if props.get("provisioningState") != "Succeeded" or vm.get("_power") != "running":
                    continue
                data = props.get("osProfile", {}).get("customData")
                if data:
                    out[vm["name"]] = extract_boot(base64.b64decode(data).decode())
        return out

    def custom_data(self, name: str) -> str:
        """A VM's custom data, decoded: the script cloud-init runs on it."""
        with self.lock:
            vm = next((v for v in self._of_kind("vm") if v["name"] == name), None)
            assert vm is not None, f"no VM {name}"
            return base64.b64decode(vm["properties"]["osProfile"]["customData"]).decode()

    def preempt(self, name: str, *, reclaim_after: float | None = None) -> dict[str, Any]:
        """Announce a Spot eviction of VM `name` through its Scheduled Events: it happens when the
        event is approved, or at NotBefore (`reclaim_after`, default `notice_seconds`)."""
        reclaim_after = self.notice_seconds if reclaim_after is None else reclaim_after
        with self.lock:
            assert self.vm(name) is not None, f"no VM {name}"
            event = {
                "EventId": str(uuid.uuid4()).upper(),
                "EventType": "Preempt",
                "ResourceType": "VirtualMachine",
                "Resources": [name],
                "EventStatus": "Scheduled",
                "NotBefore": formatdate(time.time() + self.notice_seconds, usegmt=True),
                "Description": "",
                "EventSource": "Platform",
                "DurationInSeconds": -1,
            }
            self.events.setdefault(name, []).append(event)
            next(self._incarnation)
        timer = threading.Timer(reclaim_after, self.reclaim, args=(name,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return event

    def reclaim(self, name: str) -> None:
        """The eviction itself: evictionPolicy Delete deletes the VM (and its NIC/disk)."""
        with self.lock:
            vm = self.vm(name)
            if vm is None:
                return
            self.evicted.append(name)
            if vm["properties"].get("evictionPolicy") == "Deallocate":
                vm["_power"] = "deallocated"
            else:
                self._delete_vm(vm)

    def guest_shutdown(self, name: str) -> None:
        with self.lock:
            vm = self.vm(name)
            if vm is not None:
                vm["_power"] = "stopped"

    def reset(self) -> None:
        with self.lock:
            for t in self._timers:
                t.cancel()
            self._timers.clear()
            self.resources.clear()
            self.operations.clear()
            self.events.clear()
            self.acknowledged.clear()
            self.evicted.clear()
            self.restricted.clear()
            self.zone_restricted.clear()
            self.images = set(IMAGES)
            self.identities = set(IDENTITIES)
            azure_identity_fake.reset(self)
            self._fail_next.clear()
            self._throttle = 0
            self.requests.clear()
            self.token = ARM_TOKEN

    # ------------------------------------------------------------------ plumbing

    def _of_kind(self, kind: str) -> Iterator[dict[str, Any]]:
        return (r for r in self.resources.values() if r["_kind"] == kind)

    def _id(self, req: Request) -> str:
        p = req.params
        return f"/subscriptions/{p['sub']}/resourceGroups/{p['rg']}/providers/{p['ns']}/{p['type']}/{p['name']}"

    def _guard(self, req: Request) -> Response | None:
        if req.header("authorization") != f"Bearer {self.token}":
            return _error(401, "InvalidAuthenticationToken", "The access token is invalid.")
        if "api-version" not in req.query:
            return _error(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
        if self._throttle > 0:
            self._throttle -= 1
            return Response(
                429, {"error": {"code": "TooManyRequests", "message": "throttled"}}, headers={"Retry-After": "0"}
            )
        if req.params.get("sub") not in (None, self.subscription):
            return _error(404, "SubscriptionNotFound", f"The subscription '{req.params['sub']}' could not be found.")
        rg = req.params.get("rg")
        if rg is not None and rg.lower() not in self.resource_groups:
            return _error(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        if "type" in req.params and f"{req.params['ns']}/{req.params['type']}" not in KINDS:
            return _error(400, "InvalidResourceType", f"unknown type {req.params['type']}")
        return None

    @staticmethod
    def _public(resource: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if not k.startswith("_")}

    def _start_op(
        self, location: str, ns: str, *, error: dict[str, str] | None = None, on_done: Any = None
    ) -> dict[str, str]:
        op_id = str(uuid.uuid4())
        self.operations[op_id] = {"polls": 0, "error": error, "on_done": on_done, "status": "InProgress"}
        url = f"{self.url}/subscriptions/{self.subscription}/providers/{ns}/locations/{location}/operations/{op_id}"
        return {"Azure-AsyncOperation": url + "?api-version=2024-07-01", "Retry-After": "0"}

    def _operation(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        with self.lock:
            op = self.operations.get(req.params["op"])
            if op is None:
                return _error(404, "NotFound", "no such operation")
            if op["status"] == "InProgress":
                op["polls"] += 1
                if op["polls"] >= self.op_polls:
                    if op["on_done"] is not None:
                        op["on_done"]()
                    op["status"] = "Failed" if op["error"] else "Succeeded"
            body: dict[str, Any] = {"status": op["status"], "name": req.params["op"]}
            if op["status"] == "Failed":
                body["error"] = op["error"]
            return Response(200, body, headers={"Retry-After": "0"})

    # ------------------------------------------------------------------ resources

    def _put(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        kind = KINDS[f"{req.params['ns']}/{req.params['type']}"]
        body = req.body if isinstance(req.body, dict) else {}
        rid = self._id(req)
        with self.lock:
            location = body.get("location", "")
            if location not in LOCATIONS:
                return _error(400, "LocationNotAvailableForResourceType", f"location '{location}' not available")
            resource = {
                **copy.deepcopy(body),
                "id": rid,
                "name": req.params["name"],
                "_kind": kind,
                "type": f"{req.params['ns']}/{req.params['type']}",
            }
            props = resource.setdefault("properties", {})
            if kind == "vm":
                return self._put_vm(rid, resource, props)
            if kind == "ppg" and props.get("proximityPlacementGroupType", "Standard") not in ("Standard", "Ultra"):
                return _error(400, "InvalidParameter", "proximityPlacementGroupType must be Standard or Ultra")
            if kind == "vnet":
                for sub in props.get("subnets", []):
                    sub["id"] = f"{rid}/subnets/{sub['name']}"
            if kind == "nic":
                for cfg in props.get("ipConfigurations", []):
                    cfg["properties"]["privateIPAddress"] = f"10.77.0.{4 + len(self.resources)}"
                    subnet = cfg["properties"].get("subnet", {}).get("id", "")
                    if subnet.rsplit("/subnets/", 1)[0].lower() not in self.resources:
                        return _error(400, "InvalidResourceReference", f"subnet {subnet} not found")
                    denied = azure_network.check_nic_public_ip(self, cfg["properties"], rid)
                    if denied:
                        return denied
            if kind == "pip":
                denied = azure_network.check_public_ip(resource)
                if denied:
                    return denied
            existed = rid.lower() in self.resources
            props["provisioningState"] = "Updating"  # network PUTs are asynchronous, as on ARM

            def done() -> None:
                props["provisioningState"] = "Succeeded"

            self.resources[rid.lower()] = resource
            headers = self._start_op(location, "Microsoft.Network", on_done=done)
            return Response(200 if existed else 201, self._public(resource), headers=headers)

    def _put_vm(self, rid: str, vm: dict[str, Any], props: dict[str, Any]) -> Response:
        failure = self._fail_next.pop(0) if self._fail_next else None
        if failure and not failure["async"]:
            return _error(failure["status"], failure["code"], failure["message"])
        bad = self._vm_error(vm, props)
        if bad:
            return bad
        location = vm["location"]
        ppg_ref = props.get("proximityPlacementGroup")
        if ppg_ref is not None:  # as ARM: the group must exist, in the VM's location (and zone)
            ppg = self.resources.get(str(ppg_ref.get("id", "")).lower())
            if ppg is None:
                return _error(
                    400, "InvalidResourceReference", f"Resource {ppg_ref.get('id')} referenced by {rid} not found"
                )
            if ppg["location"] != location or (ppg.get("zones") and vm.get("zones") and ppg["zones"] != vm["zones"]):
                return _error(
                    400, "ProximityPlacementGroupLocationMismatch", "The VM and its proximity placement group differ"
                )
        custom = props.get("osProfile", {}).get("customData", "")
        try:
            base64.b64decode(custom, validate=True)
        except (binascii.Error, ValueError):
            return _error(400, "InvalidParameter", "customData must be base64")
        for ref in props.get("networkProfile", {}).get("networkInterfaces", []):
            nic = self.resources.get(ref["id"].lower())
            if nic is None:
                return _error(400, "InvalidResourceReference", f"Resource {ref['id']} referenced by {rid} not found")
            owner = nic["properties"].get("virtualMachine", {}).get("id", "")
            if owner and owner.lower() != rid.lower():
                return _error(400, "NicInUse", f"Network interface {ref['id']} is used by {owner}")
            nic["properties"]["virtualMachine"] = {"id": rid}
        props.update(provisioningState="Creating", vmId=str(uuid.uuid4()))
        vm["_power"] = "starting"
        self.resources[rid.lower()] = vm
        error = {"code": failure["code"], "message": failure["message"]} if failure else None

        def done() -> None:
            if error:
                props["provisioningState"] = "Failed"
                vm["_power"] = ""
            else:
                props["provisioningState"] = "Succeeded"
                vm["_power"] = "running"

        headers = self._start_op(vm["location"], "Microsoft.Compute", error=error, on_done=done)
        return Response(201, self._public(vm), headers=headers)

    def _vm_error(self, vm: dict[str, Any], props: dict[str, Any]) -> Response | None:
        """What ARM refuses in a VM PUT, with its HTTP status and error code."""
        from azure.mgmt.compute.models import VirtualMachine

        body = {k: v for k, v in vm.items() if not k.startswith("_")}
        member = unknown_member(VirtualMachine, body)
        if member:
            return _error(
                400, "InvalidRequestContent", f"The request content was invalid and could not be deserialized: {member}"
            )
        priority = props.get("priority", "Regular")
        if priority not in ("Regular", "Low", "Spot"):
            return _error(
                400,
                "InvalidRequestContent",
                f"Error converting value \"{priority}\" to type 'VirtualMachinePriorityTypes'. "
                "Path 'properties.priority'.",
            )
        size = props.get("hardwareProfile", {}).get("vmSize", "")
        location = vm["location"]
        if size not in self.sizes:
            return _error(400, "InvalidParameter", f"The value {size} provided for the VM size is not valid.", "vmSize")
        if (location, size) in self.restricted:
            return _error(
                409,
                "SkuNotAvailable",
                f"The requested VM size {size} is currently not available in location '{location}'.",
            )
        zones = vm.get("zones") or []
        if len(zones) > 1:
            return _error(400, "InvalidParameter", "A virtual machine can be placed in one zone only.", "zones")
        for zone in zones:
            if zone not in ("1", "2", "3"):
                return _error(400, "InvalidParameter", f"The zone(s) '{zone}' for resource is not supported.", "zones")
            if zone in self.zone_restricted.get((location, size), set()):
                return _error(
                    409,
                    "SkuNotAvailable",
                    f"The requested VM size {size} is currently not available in location '{location}' zones '{zone}'.",
                )
        if priority != "Spot":
            if props.get("evictionPolicy"):
                return _error(
                    400,
                    "InvalidParameter",
                    "Eviction policy can be set only on Azure Spot Virtual Machines.",
                    "evictionPolicy",
                )
            if props.get("billingProfile"):
                return _error(
                    400,
                    "InvalidParameter",
                    "Max price can be set only for Azure Spot Virtual Machines.",
                    "billingProfile",
                )
        elif props.get("evictionPolicy") not in ("Delete", "Deallocate"):
            return _error(
                400, "InvalidParameter", "Spot VMs need an evictionPolicy of Delete or Deallocate.", "evictionPolicy"
            )
        else:
            max_price = props.get("billingProfile", {}).get("maxPrice", -1)
            if max_price != -1 and not (isinstance(max_price, (int, float)) and max_price > 0):
                return _error(400, "InvalidParameter", f"The value {max_price} of maxPrice is not valid.", "maxPrice")
        storage = props.get("storageProfile", {})
        ref = storage.get("imageReference", {})
        if "id" not in ref:
            key = (ref.get("publisher", "").lower(), ref.get("offer", "").lower(), ref.get("sku", "").lower())
            if key not in {tuple(p.lower() for p in i) for i in self.images}:
                urn = ":".join(ref.get(k, "") for k in ("publisher", "offer", "sku", "version"))
                return _error(
                    404,
                    "PlatformImageNotFound",
                    f"The platform image '{urn}' is not available. "
                    "Verify that all fields in the storage profile are correct.",
                )
        os_profile = props.get("osProfile", {})
        admin = os_profile.get("adminUsername", "")
        linux = os_profile.get("linuxConfiguration", {})
        for key in linux.get("ssh", {}).get("publicKeys", []):
            want = f"/home/{admin}/.ssh/authorized_keys"
            if key.get("path") != want:
                return _error(
                    400,
                    "InvalidParameter",
                    f"Destination path for SSH public keys is currently limited to its default value {want} "
                    "due to a known issue in Linux provisioning agent.",
                    "linuxConfiguration.ssh.publicKeys.path",
                )
            if not str(key.get("keyData", "")).startswith(("ssh-rsa ", "ssh-ed25519 ")):
                return _error(
                    400,
                    "InvalidParameter",
                    "The value of parameter linuxConfiguration.ssh.publicKeys.keyData is invalid.",
                    "linuxConfiguration.ssh.publicKeys.keyData",
                )
        if linux.get("disablePasswordAuthentication") and not linux.get("ssh", {}).get("publicKeys"):
            return _error(
                400,
                "InvalidParameter",
                "Authentication using either SSH or by user name and password must be enabled in Linux profile.",
                "linuxConfiguration",
            )
        identity = vm.get("identity")
        if identity:
            ids = list((identity.get("userAssignedIdentities") or {}).keys())
            if "UserAssigned" in identity.get("type", "") and not ids:
                return _error(
                    400, "InvalidParameter", "UserAssigned identity type needs userAssignedIdentities.", "identity"
                )
            for ident in ids:
                if not IDENTITY_RX.match(ident):
                    return _error(
                        400,
                        "InvalidParameter",
                        f"The identity id '{ident}' is not a valid user assigned identity resource id.",
                        "identity",
                    )
                known = ident.rsplit("/", 1)[-1] in self.identities or any(
                    f(ident, None) for f in self.identity_sources
                )
                if not known:  # ARM resolves the identity before anything else
                    return _error(
                        400,
                        "FailedIdentityOperation",
                        f"Identity operation for resource '{vm.get('id', '')}' failed with error 'Failed to perform "
                        f"resource identity operation. Status: 'NotFound'. Response: identity '{ident}' not found'.",
                        "identity",
                    )
        return None

    def _get(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        with self.lock:
            resource = self.resources.get(self._id(req).lower())
            if resource is None:
                return _error(
                    404,
                    "ResourceNotFound",
                    f"The Resource '{req.params['type']}/{req.params['name']}' "
                    f"under resource group '{req.params['rg']}' was not found.",
                )
            out = self._public(resource)
            if resource["_kind"] == "vm" and req.query.get("$expand") == "instanceView":
                statuses = [{"code": f"ProvisioningState/{resource['properties']['provisioningState'].lower()}"}]
                if resource.get("_power"):
                    statuses.append({"code": f"PowerState/{resource['_power']}"})
                out["properties"] = {**out["properties"], "instanceView": {"statuses": statuses}}
            return Response(200, out)

    def _delete_vm(self, vm: dict[str, Any]) -> None:
        self.resources.pop(vm["id"].lower(), None)
        self.events.pop(vm["name"], None)
        for ref in vm["properties"].get("networkProfile", {}).get("networkInterfaces", []):
            nic = self.resources.get(ref["id"].lower())
            if nic is None:
                continue
            nic["properties"].pop("virtualMachine", None)
            if ref.get("properties", {}).get("deleteOption") == "Delete":
                self.resources.pop(ref["id"].lower(), None)
                azure_network.delete_with_nic(self, nic)

    def _delete(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        rid = self._id(req).lower()
        with self.lock:
            resource = self.resources.get(rid)
            if resource is None:
                return Response(204)  # ARM: deleting what is not there succeeds with 204
            if resource["_kind"] == "nic" and resource["properties"].get("virtualMachine"):
                return _error(400, "NicInUse", f"Network Interface {resource['id']} is used by a virtual machine")
            if resource["_kind"] == "pip" and azure_network.attached_nic(self, rid):
                return _error(400, "PublicIPAddressCannotBeDeleted", f"Public IP address {resource['id']} is in use")
            if resource["_kind"] == "ppg":  # a plain (not long-running) delete: 200, refused while VMs use it
                users = [
                    r["name"]
                    for r in self.resources.values()
                    if r.get("_kind") == "vm"
                    and str((r["properties"].get("proximityPlacementGroup") or {}).get("id", "")).lower() == rid
                ]
                if users:
                    return _error(
                        409, "OperationNotAllowed", f"Proximity placement group {resource['id']} is in use by {users}"
                    )
                self.resources.pop(rid, None)
                return Response(200)
            if resource["_kind"] == "vm":
                resource["properties"]["provisioningState"] = "Deleting"
                headers = self._start_op(
                    resource["location"], "Microsoft.Compute", on_done=lambda: self._delete_vm(resource)
                )
            else:
                headers = self._start_op(
                    resource["location"], "Microsoft.Network", on_done=lambda: self.resources.pop(rid, None)
                )
            return Response(202, None, headers=headers)

    def _list(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        prefix = (
            f"/subscriptions/{req.params['sub']}/resourceGroups/{req.params['rg']}/providers/"
            f"{req.params['ns']}/{req.params['type']}/"
        ).lower()
        with self.lock:
            items = [self._public(r) for k, r in self.resources.items() if k.startswith(prefix)]
        return Response(200, {"value": items})

    def _list_all(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        with self.lock:
            return Response(200, {"value": [self._public(v) for v in self._of_kind("vm")]})

    def _skus(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        wanted = req.query.get("$filter", "")
        locations = [loc for loc in LOCATIONS if f"'{loc}'" in wanted] or list(LOCATIONS)
        value = []
        for loc in locations:
            for size in sorted(self.sizes):
                restrictions = []
                blocked = self.zone_restricted.get((loc, size))
                if blocked:
                    restrictions.append(
                        {
                            "type": "Zone",
                            "values": [loc],
                            "reasonCode": "NotAvailableForSubscription",
                            "restrictionInfo": {"locations": [loc], "zones": sorted(blocked)},
                        }
                    )
                if (loc, size) in self.restricted:
                    restrictions.append(
                        {
                            "type": "Location",
                            "values": [loc],
                            "reasonCode": self.restricted[(loc, size)],
                            "restrictionInfo": {"locations": [loc]},
                        }
                    )
                value.append(
                    {
                        "resourceType": "virtualMachines",
                        "name": size,
                        "tier": "Standard",
                        "locations": [loc],
                        "locationInfo": [{"location": loc, "zones": ["1", "2", "3"]}],
                        "restrictions": restrictions,
                    }
                )
            value.append({"resourceType": "disks", "name": "Premium_LRS", "locations": [loc], "restrictions": []})
        return Response(200, {"value": value})

    def _identity_get(self, req: Request) -> Response:
        """Microsoft.ManagedIdentity/userAssignedIdentities GET (what `check` reads)."""
        if req.header("authorization") != f"Bearer {self.token}":
            return _error(401, "InvalidAuthenticationToken", "The access token is invalid.")
        denied = self._guard(req)
        if denied:
            return denied
        name = req.params["identity"]
        for source in self.identity_sources:  # identities another fake holds (azure_keyvault_fake.attach_arm)
            found = source(req.path, req)
            if found is not None:
                return found
        if name not in self.identities:
            return _error(
                404,
                "ResourceNotFound",
                f"The Resource 'Microsoft.ManagedIdentity/userAssignedIdentities/{name}' under resource group "
                f"'{req.params['rg']}' was not found.",
            )
        rid = req.path.split("?", 1)[0]
        if rid.lower() in self.managed_identities:  # made through tests/fakes/azure_identity_fake.py
            return Response(200, self.managed_identities[rid.lower()])
        principal = str(uuid.uuid5(uuid.NAMESPACE_URL, rid))
        body = {"id": rid, "name": name, "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                "location": "eastus", "properties": {"principalId": principal, "clientId": principal,
                                                     "tenantId": str(uuid.UUID(int=1))}}  # fmt: skip
        return Response(200, body)

    # ------------------------------------------------------------------ Scheduled Events

    def _events_get(self, req: Request) -> Response:
        if req.header("metadata") != "true":
            return _error(400, "BadRequest", "Required metadata header not specified")
        if req.query.get("api-version") != "2020-07-01":
            return _error(400, "BadRequest", "unsupported api-version")
        with self.lock:
            if self.vm(req.params["vm"]) is None:
                return Response(404, "VM gone")
            events = [dict(e) for e in self.events.get(req.params["vm"], [])]
            return Response(200, {"DocumentIncarnation": len(self.events.get(req.params["vm"], [])), "Events": events})

    def _events_post(self, req: Request) -> Response:
        if req.header("metadata") != "true":
            return _error(400, "BadRequest", "Required metadata header not specified")
        starts = (req.body or {}).get("StartRequests", []) if isinstance(req.body, dict) else []
        name = req.params["vm"]
        with self.lock:
            known = {e["EventId"]: e for e in self.events.get(name, [])}
            approved = [s.get("EventId") for s in starts if s.get("EventId") in known]
            if not approved:
                return _error(400, "BadRequest", "no such EventId")
            self.acknowledged.extend(approved)
            for eid in approved:
                known[eid]["EventStatus"] = "Started"
            self.reclaim(name)  # an approved Preempt proceeds at once
        return Response(200, None)


# ---------------------------------------------------------------------- fixtures & credentials


class StaticToken:
    """A TokenCredential that hands out one fixed token (the fake checks it)."""

    def __init__(self, token: str = ARM_TOKEN) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture(scope="session", name="arm_server")
def arm_server_fixture() -> Iterator[FakeARM]:
    server = FakeARM().start()
    try:
        yield server  # type: ignore[misc]
    finally:
        server.stop()


@pytest.fixture(name="arm")
def arm_fixture(arm_server: FakeARM) -> Iterator[FakeARM]:
    """The session's fake ARM, emptied before and after the test."""
    arm_server.reset()
    try:
        yield arm_server
    finally:
        arm_server.reset()
