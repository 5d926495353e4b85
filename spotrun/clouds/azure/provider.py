"""Azure: Spot VMs (Azure Resource Manager) that boot the spotrun Agent from their custom data.

A launch creates, in the configured resource group:

* once per location, a VNet `spotrun-vnet-<location>` (one subnet) and an NSG
  `spotrun-nsg-<location>` with **no rules of our own**: Azure's defaults deny all inbound traffic
  from outside the VNet. Or `subnet_id` names an existing subnet (with a NAT gateway for egress).
* per instance, a NIC without a public IP, attached to that NSG, and the VM:
  `priority=Spot`, `evictionPolicy=Delete`, `billingProfile.maxPrice=-1` (pay up to the on-demand
  price; or `max_price`), the NIC and OS disk with `deleteOption=Delete` (an evicted VM leaves
  nothing behind), `customData` = the bootstrap script, tags `spotrun-job` / `spotrun-attempt`, the
  job's own user-assigned identity (created once per job with role assignments conditioned on its
  prefix, deleted by `release_job`: clouds/azure/identity.py; the configured `identity` for a job
  with `${VAR}` secrets or a store off Blob storage), and an SSH public key whose private half is
  never kept: nobody can log in.

Idempotency: the VM and NIC names derive from the client token; a launch first looks for its VM.
A failed create deletes the VM (Azure keeps a VM in `Failed` state) and the NIC before raising.

Errors are classified by ARM's `error.code` (never by exception class); see `classify`.
Known SDK traps handled here: azure-core refuses bearer tokens over plain http, so a test endpoint
(`http://...`) gets our own small authentication policy; the LRO poller's default interval is
30 s, so `poll_interval` is passed to every poller.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from spotrun.clock import SYSTEM_CLOCK, Clock
from spotrun.clouds.azure.images import DEFAULT, image_for
from spotrun.clouds.azure.network import delete_public_ip, egress_missing, ensure_nsg, public_ip
from spotrun.clouds.base import (
    AuthError,
    BadRequest,
    Boot,
    Instance,
    InstanceState,
    InstanceStatus,
    NoCapacity,
    PriceTooLow,
    Provider,
    ProviderError,
    QuotaExceeded,
    Throttled,
    render_bootstrap_script,
)
from spotrun.clouds.egress import add_missing

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_IMAGE = DEFAULT  # Ubuntu HPC: NVIDIA driver, CUDA, Python (the image table: clouds/azure/images.py)
DEFAULT_IMDS = "http://169.254.169.254"
ARM_SCOPE = "https://management.azure.com/.default"
TAG_JOB = "spotrun-job"
TAG_ATTEMPT = "spotrun-attempt"
TAG_TOKEN = "spotrun-token"
ADMIN_USER = "spotrun"
TOKEN_NAMESPACE = uuid.UUID("0f5f7d61-0b0e-4b7a-9a57-5d3c1a3e9c2d")
VNET_PREFIX = "10.77.0.0/16"
SUBNET_PREFIX = "10.77.0.0/20"

NO_CAPACITY_CODES = {
    "SkuNotAvailable",
    "AllocationFailed",
    "ZonalAllocationFailed",
    "OverconstrainedAllocationRequest",
    "OverconstrainedZonalAllocationRequest",
}
PRICE_CODES = {"SpotPriceGreaterThanProvidedMaxPrice"}
QUOTA_CODES = {"QuotaExceeded", "OperationNotAllowed"}  # OperationNotAllowed counts only with quota text
AUTH_CODES = {
    "AuthenticationFailed",
    "AuthorizationFailed",
    "InvalidAuthenticationToken",
    "InvalidAuthenticationTokenTenant",
    "ExpiredAuthenticationToken",
    "LinkedAuthorizationFailed",
    "SubscriptionNotFound",
}
THROTTLE_CODES = {"TooManyRequests", "SubscriptionRequestsThrottled", "RetryableError"}
NOT_FOUND_CODES = {"ResourceNotFound", "NotFound", "ResourceGroupNotFound"}

# ------------------------------------------------------------------ naming


def storage_account_env(store_url: str) -> dict[str, str]:
    """Where an `az://container/prefix` store lives, for the VM's Agent (which signs in with its
    managed identity): the account name or URL the controller uses. Never a key: a connection
    string is read only for its AccountName."""
    if not store_url.startswith("az://") or "@" in store_url.split("/", 3)[2]:
        return {}
    if os.environ.get("AZURE_STORAGE_ACCOUNT_URL"):
        return {"AZURE_STORAGE_ACCOUNT_URL": os.environ["AZURE_STORAGE_ACCOUNT_URL"]}
    account = os.environ.get("AZURE_STORAGE_ACCOUNT")
    if not account:
        parts = dict(
            p.split("=", 1) for p in os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "").split(";") if "=" in p
        )
        account = parts.get("AccountName")
    return {"AZURE_STORAGE_ACCOUNT": account} if account else {}


def vm_name(job_id: str, attempt: int, client_token: str) -> str:
    """`spotrun-<job>-<attempt>-<8 hex>`: letters, digits and '-', at most 64 characters."""
    slug = re.sub(r"[^a-z0-9-]", "-", job_id.lower()).strip("-")[:36].rstrip("-") or "job"
    return f"spotrun-{slug}-{attempt}-{uuid.uuid5(TOKEN_NAMESPACE, client_token).hex[:8]}"


def token_tag(client_token: str) -> str:
    return str(uuid.uuid5(TOKEN_NAMESPACE, client_token))


def zones_for(offer: Offer) -> list[str] | None:
    """ARM wants zone numbers ("1"); the catalog may say "eastus-1" or "1" (or "" for regional)."""
    if not offer.zone:
        return None
    last = offer.zone.rsplit("-", 1)[-1]
    return [last] if last.isdigit() else None


def image_reference(image: str) -> dict[str, str]:
    """`publisher:offer:sku:version` (a marketplace URN) or an image resource id."""
    if image.startswith("/"):
        return {"id": image}
    parts = image.split(":")
    if len(parts) != 4:
        raise BadRequest(f"Azure image {image!r}: use publisher:offer:sku:version or a resource id", code="image")
    return dict(zip(("publisher", "offer", "sku", "version"), parts, strict=True))


# ------------------------------------------------------------------ error translation


def classify(code: str, message: str, *, status: int | None = None) -> ProviderError:
    """One ARM error (by `error.code`, then HTTP status) -> a shared error."""
    text = f"{code}: {message}" if code else message
    lowered = message.lower()
    if code in NO_CAPACITY_CODES:
        return NoCapacity(text, code=code)
    if code in PRICE_CODES or (code == "OperationNotAllowed" and "max price" in lowered):
        return PriceTooLow(text, code=code)
    if code == "QuotaExceeded" or (code in QUOTA_CODES and "quota" in lowered):
        return QuotaExceeded(text, code=code, scope="region")  # Azure's vCPU quotas are per region
    if code == "RequestDisallowedByPolicy":  # an Azure Policy forbids this size/region: skip the offer
        return BadRequest(text, code=code)
    if code in AUTH_CODES or status in (401, 403):
        return AuthError(text, code=code or str(status))
    if code in THROTTLE_CODES or status == 429:
        return Throttled(text, code=code or "429")
    if status is not None and 400 <= status < 500:
        return BadRequest(text, code=code or str(status))
    return ProviderError(text, code=code or str(status or ""))


def error_code(exc: Exception) -> tuple[str, str, int | None]:
    """(code, message, HTTP status) of an azure-core error, from `exc.error` or the response body."""
    status = getattr(exc, "status_code", None)
    err = getattr(exc, "error", None)
    code, message = str(getattr(err, "code", "") or ""), str(getattr(err, "message", "") or "")
    if not code:
        response = getattr(exc, "response", None)
        try:
            body = json.loads(response.text()) if response is not None else {}
        except (ValueError, TypeError, AttributeError):
            body = {}
        inner = body.get("error", body) if isinstance(body, dict) else {}
        code = str(inner.get("code", "") or "")
        message = str(inner.get("message", "") or message)
    return code, message or str(exc), status


def _wire(model: Any) -> dict[str, Any]:
    """An SDK model as ARM's JSON (both the TypeSpec and the older msrest models)."""
    if isinstance(model, dict):
        return model
    if hasattr(model, "as_dict") and not hasattr(model, "serialize"):
        return model.as_dict()
    return model.serialize(keep_readonly=True)


def _plain_http_policy(credential: Any) -> Any:
    """Bearer tokens over http: azure-core's own policies refuse non-TLS URLs (test endpoints)."""
    from azure.core.pipeline.policies import SansIOHTTPPolicy

    class PlainHttpBearerPolicy(SansIOHTTPPolicy):  # type: ignore[misc]
        def on_request(self, request: Any) -> None:
            token = credential.get_token(ARM_SCOPE).token
            request.http_request.headers["Authorization"] = f"Bearer {token}"

    return PlainHttpBearerPolicy()


@functools.lru_cache(maxsize=1)
def _ssh_public_key() -> str:
    """An RSA public key whose private half is dropped at once: Azure wants a login, we allow none."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


# ------------------------------------------------------------------ provider


class AzureProvider(Provider):
    name = "azure"
    takes_max_price = True  # billingProfile.maxPrice
    boot_timeout = 900.0  # an Azure HPC/DSVM image boots in 2-5 min; the install ~30 s

    def __init__(
        self,
        subscription_id: str | None = None,
        resource_group: str = "spotrun",
        *,
        image: str | None = None,
        identity: str | None = None,
        subnet_id: str | None = None,
        subnet_nat: bool = False,
        max_price: float | None = None,
        disk_gb: int = 128,
        endpoint: str | None = None,
        credential: Any = None,
        imds_endpoint: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        poll_interval: float = 5.0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        """`endpoint` (tests) replaces https://management.azure.com; `imds_endpoint` is what the
        Agent polls for Scheduled Events and may contain `{instance}` (the VM name).
        `client_options` go to the SDK clients as keywords (e.g. `retry_backoff_factor`): azure-core
        retries throttling (429, honouring Retry-After) and transient failures itself."""
        self._subscription_id = subscription_id
        self.resource_group = resource_group
        self.image = image or DEFAULT_IMAGE
        self.identity = identity
        self.subnet_id = subnet_id
        self.subnet_nat = subnet_nat  # subnet_id has a NAT gateway: no public IP (clouds/azure/network.py)
        self.max_price = max_price
        self.disk_gb = int(disk_gb)
        self.endpoint = endpoint
        self._credential = credential
        self.imds_endpoint = imds_endpoint or DEFAULT_IMDS
        self.clock = clock
        self.poll_interval = poll_interval
        self.client_options = dict(client_options or {})
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._networks: dict[str, tuple[str, str]] = {}  # location -> (subnet id, nsg id)
        self._skus: dict[str, dict[str, dict[str, Any]]] = {}  # location -> size -> sku
        self._job_identities: dict[str, str] = {}  # job id -> its managed identity (made this run)
        self._placements: set[str] = set()  # proximity placement groups made for gangs this run
        self._terminated: set[str] = set()  # VM names this provider deleted (vs. evicted)

    # -------------------------------------------------------------- clients

    @property
    def subscription_id(self) -> str:
        if not self._subscription_id:
            import os

            self._subscription_id = os.environ.get("AZURE_SUBSCRIPTION_ID", "")
            if not self._subscription_id:
                raise AuthError("no Azure subscription: set azure.subscription_id or AZURE_SUBSCRIPTION_ID")
        return self._subscription_id

    def _client(self, kind: str) -> Any:
        with self._lock:
            if kind not in self._clients:
                if self._credential is None:
                    from azure.identity import DefaultAzureCredential

                    self._credential = DefaultAzureCredential()
                if kind == "compute":
                    from azure.mgmt.compute import ComputeManagementClient as cls
                else:
                    from azure.mgmt.network import NetworkManagementClient as cls
                options: dict[str, Any] = {"polling_interval": self.poll_interval, **self.client_options}
                if self.endpoint:
                    options["base_url"] = self.endpoint
                    if self.endpoint.startswith("http://"):
                        options["authentication_policy"] = _plain_http_policy(self._credential)
                self._clients[kind] = cls(self._credential, self.subscription_id, **options)
            return self._clients[kind]

    @property
    def compute(self) -> Any:
        return self._client("compute")

    @property
    def network(self) -> Any:
        return self._client("network")

    def _call(self, fn: Callable[[], T]) -> T:
        """Run one ARM call (an LRO's `.result()` included) and translate its failure by error code.
        Throttling reaching us has already been retried by azure-core: it is reported as Throttled."""
        from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError

        try:
            return fn()
        except ClientAuthenticationError as e:
            raise AuthError(f"Azure credentials rejected: {e.message}", code="credentials") from e
        except HttpResponseError as e:
            code, message, status = error_code(e)
            raise classify(code, message, status=status) from e
        except AzureError as e:  # ServiceRequestError & co: the endpoint could not be reached
            raise ProviderError(f"Azure Resource Manager unreachable: {e.message}", code="network") from e

    def _get(self, fn: Callable[[], T]) -> T | None:
        """A GET that answers None for 404 (and raises the shared errors otherwise)."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._call(fn)
        except ProviderError as e:
            if isinstance(e.__cause__, ResourceNotFoundError) and e.code not in ("ResourceGroupNotFound",):
                return None
            raise

    # -------------------------------------------------------------- launch

    def gang_placement(self, offer: Offer, job_id: str, nodes: int) -> dict[str, str]:
        """A proximity placement group for a multi-node job's nodes (one per job and location; PUT is
        idempotent), named in each node's VM body."""
        name = self._placement_name(job_id)
        body: dict[str, Any] = {
            "location": offer.region,
            "tags": {TAG_JOB: job_id},
            "properties": {"proximityPlacementGroupType": "Standard"},
        }
        zones = zones_for(offer)
        if zones:
            body["zones"] = zones
        group = self._call(
            lambda: self.compute.proximity_placement_groups.create_or_update(self.resource_group, name, body)
        )
        with self._lock:
            self._placements.add(name)
        return {"proximity_placement_group": str(_wire(group)["id"])}

    def launch(
        self, offer: Offer, *, spot: bool, boot: Boot, client_token: str, placement: dict[str, str] | None = None
    ) -> Instance:
        from spotrun.clouds.azure import identity

        identity.require(self.identity)  # no identity: the VM could not read the store
        location = offer.region
        name = vm_name(boot.job_id, boot.attempt, client_token)
        existing = self._get(lambda: self.compute.virtual_machines.get(self.resource_group, name))
        if existing is not None:
            found = _wire(existing)
            if found.get("tags", {}).get(TAG_TOKEN) != token_tag(client_token):
                raise BadRequest(f"VM {name} exists and was not started by this launch", code="conflict")
            if found.get("properties", {}).get("provisioningState") != "Failed":
                return self._to_instance(found, launched_at=self.clock.now())
            self._cleanup(name)  # a failed earlier try: start over cleanly
        self._check_sku(location, offer.instance_type, zones_for(offer))
        vm_identity = self._job_identity(boot, location)
        subnet_id, nsg_id = self._ensure_network(location)
        nsg_id = nsg_id or ensure_nsg(self, location)  # a configured subnet's NICs get it too
        notice = {"kind": "azure", "endpoint": self.imds_endpoint.replace("{instance}", name), "vm_name": name}
        boot = dataclasses.replace(boot, notice=notice, env={**boot.env, **storage_account_env(boot.store_url)})
        try:
            ip_id = public_ip(self, name, location, boot)  # egress without ingress (clouds/azure/network.py)
            nic_id = self._create_nic(name, location, subnet_id, nsg_id, boot, public_ip=ip_id)
            body = self.vm_body(
                offer, spot=spot, boot=boot, name=name, nic_id=nic_id, token=client_token, identity=vm_identity
            )
            if placement and placement.get("proximity_placement_group"):  # a multi-node gang's nodes, close
                body["properties"]["proximityPlacementGroup"] = {"id": placement["proximity_placement_group"]}
            created = self._call(
                lambda: self.compute.virtual_machines.begin_create_or_update(self.resource_group, name, body).result()
            )
        except BaseException:
            try:
                self._cleanup(name)  # Azure keeps a Failed VM and its NIC: remove both before raising
            except ProviderError:
                pass  # the VM is tagged: the controller's list_owned sweep still finds it
            raise
        return self._to_instance(_wire(created), launched_at=self.clock.now())

    def vm_body(
        self, offer: Offer, *, spot: bool, boot: Boot, name: str, nic_id: str, token: str, identity: str | None = None
    ) -> dict[str, Any]:
        """The VM resource one launch sends, as ARM JSON (its identity: `identity`, else the
        configured one)."""
        properties: dict[str, Any] = {
            "hardwareProfile": {"vmSize": offer.instance_type},
            "storageProfile": {
                "imageReference": image_reference(image_for(offer, self.image)),
                "osDisk": {
                    "createOption": "FromImage",
                    "deleteOption": "Delete",
                    "diskSizeGB": self.disk_gb,
                    "managedDisk": {"storageAccountType": "StandardSSD_LRS"},
                },
            },
            "osProfile": {
                "computerName": name,
                "adminUsername": ADMIN_USER,
                "customData": base64.b64encode(render_bootstrap_script(boot).encode()).decode(),
                "linuxConfiguration": {
                    "disablePasswordAuthentication": True,
                    "ssh": {
                        "publicKeys": [
                            {"path": f"/home/{ADMIN_USER}/.ssh/authorized_keys", "keyData": _ssh_public_key()}
                        ]
                    },
                },
            },
            "networkProfile": {
                "networkInterfaces": [{"id": nic_id, "properties": {"primary": True, "deleteOption": "Delete"}}]
            },
        }
        if spot:
            properties.update(
                priority="Spot",
                evictionPolicy="Delete",
                billingProfile={"maxPrice": self.max_price if self.max_price is not None else -1},
            )
        else:
            properties["priority"] = "Regular"
        body: dict[str, Any] = {
            "location": offer.region,
            "tags": self._tags(boot, token),
            "properties": properties,
        }
        zones = zones_for(offer)
        if zones:
            body["zones"] = zones
        vm_identity = identity or self.identity
        if vm_identity:
            body["identity"] = {"type": "UserAssigned", "userAssignedIdentities": {vm_identity: {}}}
        return body

    def _job_identity(self, boot: Boot, location: str) -> str | None:
        """The job's own managed identity, created with its conditioned role assignments once per
        job (per-job scoping: clouds/azure/identity.py); None where the configured one is used."""
        from spotrun.clouds.azure import identity

        if not identity.uses_job_identity(boot):
            return None
        with self._lock:
            if boot.job_id in self._job_identities:
                return self._job_identities[boot.job_id]
        rid = identity.ensure_job_identity(self, boot, location)
        with self._lock:
            self._job_identities[boot.job_id] = rid
        return rid

    def release_job(self, job_id: str) -> None:
        """The job's role assignments and managed identity are deleted."""
        from spotrun.clouds.azure import identity

        with self._lock:
            self._job_identities.pop(job_id, None)
            placement = self._placement_name(job_id)
            made = placement in self._placements
            self._placements.discard(placement)
        identity.release_job_identity(self, job_id)
        if made:
            self._delete_placement(placement)

    @staticmethod
    def _placement_name(job_id: str) -> str:
        return f"spotrun-{job_id}"[:80]

    def _delete_placement(self, name: str) -> None:
        """A gang's proximity placement group, deleted once its VMs are (free, but clutter; one a
        restarted controller did not make itself is left, as on AWS). Never fails the job's end."""
        try:
            self._call(lambda: self.compute.proximity_placement_groups.delete(self.resource_group, name))
        except ProviderError as e:
            log.warning("cannot delete proximity placement group %s: %s", name, e)

    @staticmethod
    def _tags(boot: Boot, token: str) -> dict[str, str]:
        return {**boot.labels, TAG_JOB: boot.job_id, TAG_ATTEMPT: str(boot.attempt), TAG_TOKEN: token_tag(token)}

    def _check_sku(self, location: str, size: str, zones: list[str] | None) -> None:
        """Resource SKUs say whether this subscription may use `size` here at all (cached)."""
        if location not in self._skus:
            listing = self._call(lambda: list(self.compute.resource_skus.list(filter=f"location eq '{location}'")))
            table: dict[str, dict[str, Any]] = {}
            for sku in map(_wire, listing):
                if sku.get("resourceType") == "virtualMachines":
                    table[sku.get("name", "")] = sku
            self._skus[location] = table
        sku = self._skus[location].get(size)
        if sku is None:
            raise BadRequest(f"VM size {size} is not offered in {location}", code="SkuNotFound")
        for restriction in sku.get("restrictions") or []:
            values = set(restriction.get("restrictionInfo", {}).get("zones") or [])
            blocked = restriction.get("type") == "Location" or (zones and set(zones) <= values)
            if blocked and restriction.get("reasonCode") == "NotAvailableForSubscription":
                raise BadRequest(  # never launchable for this subscription: not worth a cooldown and retry
                    f"SkuNotAvailable: {size} in {location} is not available for this subscription",
                    code="SkuNotAvailable",
                )
            if blocked:
                raise NoCapacity(
                    f"SkuNotAvailable: {size} in {location}: {restriction.get('reasonCode', 'restricted')}",
                    code="SkuNotAvailable",
                )

    def _ensure_network(self, location: str) -> tuple[str, str]:
        """The subnet and NSG instances in `location` use; created once, never with inbound rules."""
        if self.subnet_id:
            return self.subnet_id, ""
        if location in self._networks:
            return self._networks[location]
        rg, net = self.resource_group, self.network
        nsg_name, vnet_name = f"spotrun-nsg-{location}", f"spotrun-vnet-{location}"
        nsg = self._get(lambda: net.network_security_groups.get(rg, nsg_name))
        if nsg is None:
            body = {"location": location, "tags": {"spotrun": "network"}, "properties": {"securityRules": []}}
            nsg = self._call(lambda: net.network_security_groups.begin_create_or_update(rg, nsg_name, body).result())
        vnet = self._get(lambda: net.virtual_networks.get(rg, vnet_name))
        if vnet is None:
            body = {
                "location": location,
                "tags": {"spotrun": "network"},
                "properties": {
                    "addressSpace": {"addressPrefixes": [VNET_PREFIX]},
                    "subnets": [{"name": "spotrun", "properties": {"addressPrefix": SUBNET_PREFIX}}],
                },
            }
            vnet = self._call(lambda: net.virtual_networks.begin_create_or_update(rg, vnet_name, body).result())
        subnets = _wire(vnet).get("properties", {}).get("subnets", [])
        if not subnets:
            raise BadRequest(f"VNet {vnet_name} has no subnet", code="subnet")
        self._networks[location] = (subnets[0]["id"], _wire(nsg)["id"])
        return self._networks[location]

    def _create_nic(
        self, name: str, location: str, subnet_id: str, nsg_id: str, boot: Boot, *, public_ip: str | None = None
    ) -> str:
        config: dict[str, Any] = {"subnet": {"id": subnet_id}, "privateIPAllocationMethod": "Dynamic"}
        if public_ip:  # for egress; inbound stays closed by the NSG
            config["publicIPAddress"] = {"id": public_ip}
        properties: dict[str, Any] = {"ipConfigurations": [{"name": "ipconfig1", "properties": config}]}
        if nsg_id:
            properties["networkSecurityGroup"] = {"id": nsg_id}
        body = {
            "location": location,
            "tags": {TAG_JOB: boot.job_id, TAG_ATTEMPT: str(boot.attempt)},
            "properties": properties,
        }
        nic = self._call(
            lambda: self.network.network_interfaces.begin_create_or_update(
                self.resource_group, f"{name}-nic", body
            ).result()
        )
        return _wire(nic)["id"]

    def _cleanup(self, name: str) -> None:
        """Delete the VM (if any), then its NIC (if any). Idempotent; used on failure and terminate."""
        from azure.core.exceptions import ResourceNotFoundError

        rg = self.resource_group
        for delete in (
            lambda: self.compute.virtual_machines.begin_delete(rg, name).result(),
            lambda: self.network.network_interfaces.begin_delete(rg, f"{name}-nic").result(),
        ):
            try:
                self._call(delete)
            except ProviderError as e:
                if not isinstance(e.__cause__, ResourceNotFoundError):
                    raise
        delete_public_ip(self, name)  # once the NIC is gone (Azure refuses to delete an IP in use)

    def _to_instance(self, vm: dict[str, Any], *, launched_at: float) -> Instance:
        tags = vm.get("tags") or {}
        props = vm.get("properties", {})
        zones = vm.get("zones") or []
        return Instance(
            provider=self.name,
            instance_id=vm["name"],
            region=vm.get("location", ""),
            zone=zones[0] if zones else "",
            instance_type=props.get("hardwareProfile", {}).get("vmSize", ""),
            spot=props.get("priority") == "Spot",
            job_id=tags.get(TAG_JOB, ""),
            attempt=int(tags.get(TAG_ATTEMPT, "0") or 0),
            launched_at=launched_at,
            details={"resource_group": self.resource_group, "id": vm.get("id", ""), "vm_id": props.get("vmId", "")},
        )

    # -------------------------------------------------------------- poll / terminate / list

    def poll(self, instance: Instance) -> InstanceState:
        name = instance.instance_id
        vm = self._get(lambda: self.compute.virtual_machines.get(self.resource_group, name, expand="instanceView"))
        if vm is None:
            if name in self._terminated:
                return InstanceState(InstanceStatus.TERMINATED, reason="deleted")
            # Spot VMs are created with evictionPolicy=Delete: a spot VM we did not delete was evicted.
            if instance.spot:
                return InstanceState(InstanceStatus.PREEMPTED, reason="spot VM evicted (deleted)")
            return InstanceState(InstanceStatus.TERMINATED, reason="VM deleted outside spotrun")
        props = _wire(vm).get("properties", {})
        if instance.details.get("vm_id") and props.get("vmId") not in (None, "", instance.details["vm_id"]):
            return InstanceState(InstanceStatus.TERMINATED, reason="VM replaced by another of the same name")
        if props.get("provisioningState") == "Failed":
            return InstanceState(InstanceStatus.FAILED, reason="provisioning failed")
        codes = [s.get("code", "") for s in (props.get("instanceView") or {}).get("statuses", [])]
        power = next((c.split("/", 1)[1] for c in codes if c.startswith("PowerState/")), "")
        if power == "running":
            return InstanceState(InstanceStatus.RUNNING)
        if power in ("", "starting", "creating"):
            return InstanceState(InstanceStatus.PENDING, reason=power or "provisioning")
        if power == "stopping":
            return InstanceState(InstanceStatus.RUNNING, reason="stopping")
        if power in ("deallocating", "deallocated") and props.get("priority") == "Spot":
            return InstanceState(InstanceStatus.PREEMPTED, reason=f"spot VM {power}")
        return InstanceState(InstanceStatus.TERMINATED, reason=f"VM {power}")

    def terminate(self, instance: Instance) -> None:
        self._terminated.add(instance.instance_id)
        self._cleanup(instance.instance_id)

    def list_owned(self, job_id: str) -> list[Instance]:
        vms = self._call(lambda: list(self.compute.virtual_machines.list(self.resource_group)))
        owned = []
        for vm in map(_wire, vms):
            if (vm.get("tags") or {}).get(TAG_JOB) == job_id:
                owned.append(self._to_instance(vm, launched_at=0.0))
        return owned

    def check(self) -> dict[str, Any]:
        """Lists the resource group's VMs: proves the credential, subscription and group."""
        from spotrun.clouds.azure import identity

        missing: list[str] = []
        try:
            self._call(lambda: next(iter(self.compute.virtual_machines.list(self.resource_group)), None))
        except ProviderError as e:
            return {"provider": self.name, "usable": False, "detail": str(e), "missing": [str(e)]}
        missing += identity.check_items(self)
        result = {
            "provider": self.name,
            "usable": not missing,
            "detail": f"subscription {self.subscription_id}, resource group {self.resource_group}",
            "missing": missing,
        }
        return add_missing(result, egress_missing(self))
