"""A local fake of the Compute Engine REST API (the subset spotrun's GCP provider uses).

The real `google-cloud-compute` client talks to it over HTTP (`client_options={"api_endpoint": url}`):

    projects.get; instances insert/get/delete/list/aggregatedList (with `labels.K="v"` filters);
    zone operations get/wait/list (with `operationType="..."` filters); acceleratorTypes get/list;
    IAM service accounts and bucket IAM policies (tests/fakes/gcp_iam_fake.py).

Behaviour that matters to the provider, modelled on the real API:

* insert/delete answer with a zone operation (PENDING) that finishes after `op_polls` polls;
  the instance appears (or disappears) when its operation is DONE. A repeated `requestId`
  returns the first operation and creates nothing.
* capacity/quota failures surface in the *operation's* `error` (by default without
  `httpErrorStatusCode`, the case where the SDK's `result()` does not raise); authorization,
  validation and rate limits fail the HTTP call itself.
* `fail_next_insert(code, ...)` makes the next insert fail with that code; `exhaust(zone)`
  makes every insert in a zone fail with ZONE_RESOURCE_POOL_EXHAUSTED.
* a per-instance metadata server under `/_metadata/<name>` (`metadata_endpoint`) serves
  `computeMetadata/v1/instance/preempted` (needs `Metadata-Flavor: Google`).
* `preempt(name)` does what GCE does to a Spot VM: metadata `preempted` turns TRUE, a
  `compute.instances.preempted` operation is recorded, the VM goes STOPPING, and after the
  notice (`reclaim(name)`, or `reclaim_after` seconds) it is deleted (termination action DELETE).
"""

from __future__ import annotations

import copy
import itertools
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from spotrun.clouds.base import Boot, extract_boot
from tests.fakes import gce_network, gcp_iam_fake
from tests.fakes.rest_fake import Request, Response, RestFake

PROJECT = "spotrun-test"
ZONES = ("us-central1-a", "us-central1-b", "us-east1-c", "europe-west4-a")
GOOD_TOKEN = "gce-test-token"
ACCELERATORS = ("nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-l4", "nvidia-tesla-a100")
NAME_RX = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
BUILT_IN_GPU_FAMILIES = ("a2-", "a3-", "a4-", "g2-")
HYPERDISK_ONLY = ("a3-ultragpu-", "a4-", "a4x-")
# Machine types the fake knows: every GCP type of the bundled catalog (real data) and a few CPU ones.
EXTRA_MACHINE_TYPES = ("e2-standard-2", "e2-standard-4", "n1-standard-1", "n1-standard-2", "n2-standard-4")
DISK_TYPES = ("pd-standard", "pd-balanced", "pd-ssd", "pd-extreme", "hyperdisk-balanced", "hyperdisk-extreme")
# Public images the fake knows (image or family links), as `projects/<p>/global/images/...`.
IMAGES = (
    "projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204-py310",
    "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570",
    "projects/deeplearning-platform-release/global/images/family/pytorch-latest-gpu",
    "projects/debian-cloud/global/images/family/debian-12",
    "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts",
)
NETWORKS = ("default",)
SUBNETWORKS = ("default",)  # in every region
SERVICE_ACCOUNTS = (
    "spotrun-runner@spotrun-test.iam.gserviceaccount.com",
    "runner@spotrun-test.iam",
)
GOOGLE_SCOPES = "https://www.googleapis.com/auth/"
P = r"/compute/v1/projects/(?P<project>[^/]+)"
Z = P + r"/zones/(?P<zone>[^/]+)"


def _error(status: int, reason: str, message: str) -> Response:
    return Response(
        status,
        {
            "error": {
                "code": status,
                "message": message,
                "errors": [{"domain": "global", "reason": reason, "message": message}],
            }
        },
    )


class FakeGCE(RestFake):
    def __init__(
        self,
        *,
        project: str = PROJECT,
        zones: tuple[str, ...] = ZONES,
        op_polls: int = 2,
        op_seconds: float = 0.1,
        wait_cap: float = 2.0,
    ) -> None:
        super().__init__()
        self.project = project
        self.zones = set(zones)
        self.op_polls = op_polls  # an operation GET-polled is DONE at the op_polls-th poll at the earliest
        self.op_seconds = op_seconds  # ... and not before op_seconds have passed
        self.wait_cap = wait_cap  # `/wait` returns at DONE or after this long (the real API: ~2 min)
        self.preempt_seconds = 30.0  # a preempted VM is stopped (deleted) this long after the notice
        self.machine_types = _catalog_machine_types() | set(EXTRA_MACHINE_TYPES)
        self.images = set(IMAGES)
        self.networks = set(NETWORKS)
        self.subnetworks = set(SUBNETWORKS)
        self.service_accounts = set(SERVICE_ACCOUNTS)
        self.token = GOOD_TOKEN
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}
        self.operations: dict[tuple[str, str], dict[str, Any]] = {}
        self.policies: dict[tuple[str, str], dict[str, Any]] = {}  # (region, name) -> resource policy
        self.region_operations: dict[tuple[str, str], dict[str, Any]] = {}
        self.request_ids: dict[str, tuple[str, str]] = {}
        self.preempted: set[str] = set()  # instance names whose metadata says TRUE
        self.serial_sources: dict[str, Any] = {}  # name -> () -> str: its serial console (emulated VMs)
        self.accelerators = {z: set(ACCELERATORS) for z in zones}
        self.exhausted: set[str] = set()
        self._fail_next: list[dict[str, Any]] = []
        self._throttle = 0
        self._ids = itertools.count(4_000_000_000_000_000_001)
        self._ops = itertools.count(1)
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}  # op key -> effect when DONE
        self._timers: list[threading.Timer] = []
        self._routes_()

    # ------------------------------------------------------------------ test hooks

    @property
    def metadata_endpoint(self) -> str:
        """For `GCPProvider(imds_endpoint=...)`: each instance gets its own metadata path."""
        return f"{self.url}/_metadata/{{instance}}"

    def fail_next_insert(
        self,
        code: str,
        message: str = "",
        *,
        http_status: int | None = None,
        sync: bool = False,
        reason: str = "",
        quota_metric: str = "",
    ) -> None:
        """The next insert fails: in its operation (`sync=False`, with `httpErrorStatusCode` only if
        `http_status` is given) or as the HTTP answer to the insert itself (`sync=True`)."""
        self._fail_next.append(
            {
                "code": code,
                "message": message or f"fake failure {code}",
                "http_status": http_status,
                "sync": sync,
                "reason": reason or code,
                "quota_metric": quota_metric,
            }
        )

    def exhaust(self, zone: str, exhausted: bool = True) -> None:
        (self.exhausted.add if exhausted else self.exhausted.discard)(zone)

    def throttle_next(self, n: int) -> None:
        """The next n API calls answer 403 rateLimitExceeded."""
        self._throttle = n

    def instance(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            return next((i for (_, n), i in self.instances.items() if n == name), None)

    def running_boots(self) -> dict[str, Boot]:
        """Each RUNNING/STOPPING instance's boot record, read back from its startup script."""
        out = {}
        with self.lock:
            for (_, name), inst in self.instances.items():
                if inst["status"] not in ("RUNNING", "STOPPING"):
                    continue
                items = {i["key"]: i["value"] for i in inst.get("metadata", {}).get("items", [])}
                if "startup-script" in items:
                    out[name] = extract_boot(items["startup-script"])
        return out

    def preempt(self, name: str, *, reclaim_after: float | None = None) -> None:
        """Preempt a Spot VM: metadata `preempted` TRUE, STOPPING, the preempted operation; the
        guest gets its ACPI shutdown now (the emulator's part) and the VM is stopped/deleted after
        `reclaim_after` seconds (GCE: 30 s, `preempt_seconds`) unless `reclaim(name)` comes first."""
        reclaim_after = self.preempt_seconds if reclaim_after is None else reclaim_after
        with self.lock:
            inst = self.instance(name)
            assert inst is not None, f"no instance {name}"
            zone = inst["zone"].rsplit("/", 1)[-1]
            self.preempted.add(name)
            inst["status"] = "STOPPING"
            op = self._new_op(zone, "compute.instances.preempted", inst, status="DONE")
            op["user"] = "system"
        timer = threading.Timer(reclaim_after, self.reclaim, args=(name,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def reclaim(self, name: str) -> None:
        """The end of the notice: a preempted Spot VM with termination action DELETE is deleted."""
        with self.lock:
            for key, inst in list(self.instances.items()):
                if key[1] == name:
                    action = inst.get("scheduling", {}).get("instanceTerminationAction", "STOP")
                    if action == "DELETE":
                        del self.instances[key]
                    else:
                        inst["status"] = "TERMINATED"

    def guest_shutdown(self, name: str) -> None:
        """The guest powered itself off (the Agent finished): the VM is TERMINATED, not deleted."""
        with self.lock:
            inst = self.instance(name)
            if inst is not None:
                inst["status"] = "TERMINATED"

    def reset(self) -> None:
        with self.lock:
            for t in self._timers:
                t.cancel()
            self._timers.clear()
            self.instances.clear()
            self.operations.clear()
            self.policies.clear()
            self.region_operations.clear()
            self.request_ids.clear()
            self.preempted.clear()
            self.exhausted.clear()
            self._fail_next.clear()
            self._pending.clear()
            self._throttle = 0
            self.requests.clear()
            self.token = GOOD_TOKEN
            self.accelerators = {z: set(ACCELERATORS) for z in self.zones}
            self.images = set(IMAGES)
            self.networks = set(NETWORKS)
            self.subnetworks = set(SUBNETWORKS)
            self.service_accounts = set(SERVICE_ACCOUNTS)
            self.firewalls.clear()
            self.routers.clear()
            gcp_iam_fake.reset(self)

    # ------------------------------------------------------------------ routes

    def _routes_(self) -> None:
        r = self.route
        r("GET", P, self._project)
        r("GET", r"/v1/projects/(?P<sa_project>[^/]+)/serviceAccounts/(?P<email>[^/]+)", self._sa_get)
        r("POST", Z + r"/instances", self._insert)
        r("GET", Z + r"/instances", self._list)
        r("GET", Z + r"/instances/(?P<name>[^/]+)", self._get)
        r("GET", Z + r"/instances/(?P<name>[^/]+)/serialPort", self._serial)
        r("DELETE", Z + r"/instances/(?P<name>[^/]+)", self._delete)
        r("GET", P + r"/aggregated/instances", self._aggregated)
        r("GET", Z + r"/operations/(?P<op>[^/]+)", self._op_get)
        r("POST", Z + r"/operations/(?P<op>[^/]+)/wait", self._op_wait)
        r("GET", Z + r"/operations", self._op_list)
        r("GET", Z + r"/acceleratorTypes/(?P<acc>[^/]+)", self._acc_get)
        r("GET", Z + r"/acceleratorTypes", self._acc_list)
        R = P + r"/regions/(?P<region>[^/]+)"  # noqa: N806
        r("POST", R + r"/resourcePolicies", self._policy_insert)
        r("GET", R + r"/resourcePolicies/(?P<name>[^/]+)", self._policy_get)
        r("DELETE", R + r"/resourcePolicies/(?P<name>[^/]+)", self._policy_delete)
        r("GET", R + r"/operations/(?P<op>[^/]+)", self._region_op)
        r("POST", R + r"/operations/(?P<op>[^/]+)/wait", self._region_op)
        r("GET", r"/_metadata/(?P<name>[^/]+)/computeMetadata/v1/instance/(?P<key>[a-z-]+)", self._metadata)
        r(
            "GET",
            r"/_metadata/(?P<name>[^/]+)/computeMetadata/v1/instance/service-accounts/default/token",
            self._sa_token,
        )
        gce_network.install(self)  # firewalls, routers: spotrun's egress (tests/fakes/gce_network.py)
        gcp_iam_fake.install(self)  # service accounts, bucket IAM: per-job identity (tests/fakes/gcp_iam_fake.py)

    def _guard(self, req: Request) -> Response | None:
        """Authorization, project and zone checks, and injected rate limits."""
        auth = req.header("authorization")
        if auth != f"Bearer {self.token}":
            if auth.startswith("Bearer forbidden"):
                return _error(403, "forbidden", "Required 'compute.instances.create' permission")
            return Response(
                401,
                {
                    "error": {
                        "code": 401,
                        "status": "UNAUTHENTICATED",
                        "message": "Request had invalid authentication credentials.",
                        "errors": [{"reason": "authError", "message": "Invalid Credentials"}],
                    }
                },
            )
        if self._throttle > 0:
            self._throttle -= 1
            return _error(403, "rateLimitExceeded", "Rate Limit Exceeded")
        if req.params.get("project") != self.project:
            return _error(404, "notFound", f"The resource 'projects/{req.params.get('project')}' was not found")
        zone = req.params.get("zone")
        if zone is not None and zone not in self.zones:
            return _error(400, "invalid", f"Invalid value for field 'zone': '{zone}'. Unknown zone.")
        return None

    def _sa_get(self, req: Request) -> Response:
        """IAM `projects.serviceAccounts.get` (iam.googleapis.com; served here for `check`)."""
        if req.header("authorization") != f"Bearer {self.token}":
            return Response(
                401, {"error": {"code": 401, "message": "Invalid Credentials", "status": "UNAUTHENTICATED"}}
            )
        email = req.params["email"]
        if email not in self.service_accounts:
            return Response(404, {"error": {"code": 404, "message": "Unknown service account", "status": "NOT_FOUND"}})
        if email in self.account_records:  # made through the IAM fake (tests/fakes/gcp_iam_fake.py)
            return Response(200, self.account_records[email])
        name = f"projects/{self.project}/serviceAccounts/{email}"
        return Response(200, {"name": name, "email": email, "projectId": self.project, "uniqueId": "1" * 21})

    def _project(self, req: Request) -> Response:
        return self._guard(req) or Response(200, {"kind": "compute#project", "name": self.project, "id": "1234"})

    def _link(self, *parts: str) -> str:
        return f"{self.url}/compute/v1/projects/{self.project}/" + "/".join(parts)

    def _new_op(self, zone: str, kind: str, inst: dict[str, Any], *, status: str = "PENDING") -> dict[str, Any]:
        name = f"operation-{int(time.time() * 1000)}-{next(self._ops):06d}"
        op = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": name,
            "zone": self._link("zones", zone),
            "operationType": kind,
            "targetLink": self._link("zones", zone, "instances", inst["name"]),
            "targetId": inst.get("id", "0"),
            "status": status,
            "progress": 100 if status == "DONE" else 0,
            "insertTime": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
            "selfLink": self._link("zones", zone, "operations", name),
            "_polls": 0,
            "_ready_at": time.monotonic() + self.op_seconds,
        }
        self.operations[(zone, name)] = op
        return op

    @staticmethod
    def _public(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    # ------------------------------------------------------------------ resource policies (placement)

    def _policy_insert(self, req: Request) -> Response:
        """A compact placement policy, as GCE checks it: a valid name, collocation COLLOCATED (or
        unspecified), vmCount 1-22 with COLLOCATED; a second one of the same name is a conflict."""
        denied = self._guard(req)
        if denied:
            return denied
        region, body = req.params["region"], req.body or {}
        name = body.get("name", "")
        if not NAME_RX.match(name):
            return _error(400, "invalid", f"Invalid value for field 'resource.name': '{name}'")
        placement = body.get("groupPlacementPolicy")
        if not isinstance(placement, dict):
            return _error(400, "invalid", "Exactly one policy type must be specified.")
        collocation = placement.get("collocation", "UNSPECIFIED_COLLOCATION")
        if collocation not in ("COLLOCATED", "UNSPECIFIED_COLLOCATION"):
            return _error(
                400, "invalid", f"Invalid value for field 'resource.groupPlacementPolicy.collocation': '{collocation}'"
            )
        count = int(placement.get("vmCount", 0) or 0)
        if collocation == "COLLOCATED" and not 1 <= count <= 22:
            field = "resource.groupPlacementPolicy.vmCount"
            return _error(400, "invalid", f"Invalid value for field '{field}': '{count}'")
        with self.lock:
            if (region, name) in self.policies:
                return _error(409, "alreadyExists", f"The resource '{name}' already exists")
            policy = {**body, "kind": "compute#resourcePolicy", "region": self._link("regions", region)}
            policy.update(selfLink=self._link("regions", region, "resourcePolicies", name), status="READY")
            self.policies[(region, name)] = policy
            return Response(200, self._public(self._region_op_done(region, "insert", name, policy["selfLink"])))

    def _policy_get(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        with self.lock:
            policy = self.policies.get((req.params["region"], req.params["name"]))
        if policy is None:
            return _error(404, "notFound", f"The resource 'resourcePolicies/{req.params['name']}' was not found")
        return Response(200, policy)

    def _policy_delete(self, req: Request) -> Response:
        """As Compute Engine: 404 for an unknown policy, 400 `resourceInUseByAnotherResource` while
        an instance still names it (a deleted instance frees it once its delete is done)."""
        denied = self._guard(req)
        if denied:
            return denied
        region, name = req.params["region"], req.params["name"]
        with self.lock:
            policy = self.policies.get((region, name))
            if policy is None:
                return _error(404, "notFound", f"The resource 'resourcePolicies/{name}' was not found")
            users = [
                i["name"]
                for i in self.instances.values()
                if any(str(p).endswith(f"/resourcePolicies/{name}") for p in i.get("resourcePolicies", []))
            ]
            if users:
                return _error(
                    400,
                    "resourceInUseByAnotherResource",
                    f"The resource_policy resource '{policy['selfLink']}' is already being used by '{users[0]}'",
                )
            del self.policies[(region, name)]
            return Response(200, self._public(self._region_op_done(region, "delete", name, policy["selfLink"])))

    def _region_op_done(self, region: str, kind: str, name: str, target: str) -> dict[str, Any]:
        """A region operation that is already DONE (a placement policy's insert or delete)."""
        op = self._new_op(region, kind, {"name": name}, status="DONE")
        op.pop("zone", None)
        op.update(region=self._link("regions", region), targetLink=target)
        self.region_operations[(region, op["name"])] = op
        return op

    def _region_op(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        with self.lock:
            op = self.region_operations.get((req.params["region"], req.params["op"]))
        if op is None:
            return _error(404, "notFound", f"The resource 'operations/{req.params['op']}' was not found")
        return Response(200, self._public(op))

    def _check_policies(self, zone: str, body: dict[str, Any]) -> Response | None:
        """Each resourcePolicies link must name a policy in the zone's region; a compact one holds at
        most vmCount instances."""
        region = zone.rsplit("-", 1)[0]
        for link in body.get("resourcePolicies", []):
            parts = str(link).split("/")
            if "regions" not in parts or "resourcePolicies" not in parts:
                return _error(400, "invalid", f"Invalid value for field 'resource.resourcePolicies[0]': '{link}'")
            where, name = parts[parts.index("regions") + 1], parts[-1]
            policy = self.policies.get((where, name))
            if policy is None:
                return _error(404, "notFound", f"The resource '{link}' was not found")
            if where != region:
                return _error(400, "invalid", f"Resource policy {name} is in {where}, the instance in {region}")
            count = int(policy.get("groupPlacementPolicy", {}).get("vmCount", 0) or 0)
            members = [
                i
                for i in self.instances.values()
                if any(str(p).endswith(f"/{name}") for p in i.get("resourcePolicies", []))
            ]
            if count and len(members) >= count:
                return _error(400, "invalid", f"Resource policy {name} already has {count} instances (vmCount)")
        return None

    def _validate(self, zone: str, body: dict[str, Any]) -> Response | None:
        """What Compute Engine refuses in an insert, with its HTTP status and `errors[].reason`:
        the schema (google-cloud-compute's own `Instance` message), then each referenced resource."""
        schema = _schema_error(body)
        if schema:
            return _error(400, "invalid", schema)
        bad = self._check_policies(zone, body)
        if bad is not None:
            return bad
        name = body.get("name", "")
        if not NAME_RX.match(name):
            return _error(400, "invalid", f"Invalid value for field 'resource.name': '{name}'")
        mtype_link = body.get("machineType", "")
        mtype = mtype_link.rsplit("/", 1)[-1]
        if not mtype:
            return _error(400, "invalid", "Invalid value for field 'resource.machineType': ''")
        if mtype not in self.machine_types:
            return _error(
                400,
                "invalid",
                f"Invalid value for field 'resource.machineType': '{mtype_link}'. "
                f"Machine type with name '{mtype}' does not exist in zone '{zone}'.",
            )
        accelerators = body.get("guestAccelerators", [])
        for acc in accelerators:
            acc_name = acc.get("acceleratorType", "").rsplit("/", 1)[-1]
            if mtype.startswith(BUILT_IN_GPU_FAMILIES):
                return _error(400, "invalid", f"Machine type {mtype} does not support additional accelerators")
            if acc_name not in self.accelerators.get(zone, set()):
                return _error(400, "invalid", f"Invalid value for field 'acceleratorType': '{acc_name}'")
        scheduling = body.get("scheduling", {})
        has_gpu = bool(accelerators) or mtype.startswith(BUILT_IN_GPU_FAMILIES)
        if has_gpu and scheduling.get("onHostMaintenance", "MIGRATE") != "TERMINATE":
            return _error(400, "badRequest", "Instances with guest accelerators do not support live migration.")
        model = scheduling.get("provisioningModel", "STANDARD")
        action = scheduling.get("instanceTerminationAction")
        if action and model != "SPOT":
            return _error(
                400,
                "invalid",
                f"Invalid value for field 'resource.scheduling.instanceTerminationAction': '{action}'. "
                "Instance Termination Action is only supported for SPOT provisioning model.",
            )
        if model == "SPOT" and scheduling.get("automaticRestart") is True:
            return _error(
                400,
                "invalid",
                "Invalid value for field 'resource.scheduling.automaticRestart': 'true'. "
                "Spot VMs cannot have automatic restart enabled.",
            )
        disks = body.get("disks", [])
        if not disks:
            return _error(400, "invalid", "At least one disk should be attached to the instance")
        for i, disk in enumerate(disks):
            bad = self._disk_error(zone, mtype, i, disk)
            if bad:
                return bad
        for nic in body.get("networkInterfaces", []):
            bad = self._network_error(zone, nic)
            if bad:
                return bad
        for sa in body.get("serviceAccounts", []):
            email = sa.get("email", "")
            if email not in self.service_accounts:
                return _error(
                    404, "notFound", f"The resource 'One of [{email}]' of type 'serviceAccount' was not found."
                )
            for scope in sa.get("scopes", []):
                if not scope.startswith(GOOGLE_SCOPES):
                    return _error(
                        400, "invalid", f"Invalid value for field 'resource.serviceAccounts[0].scopes': '{scope}'"
                    )
        return None

    def _disk_error(self, zone: str, mtype: str, i: int, disk: dict[str, Any]) -> Response | None:
        params = disk.get("initializeParams", {})
        image = params.get("sourceImage", "")
        if disk.get("boot") and not image and not disk.get("source"):
            return _error(400, "invalid", f"Invalid value for field 'resource.disks[{i}]': a boot disk needs a source")
        if image and _local(image) not in self.images:
            return _error(404, "notFound", f"The resource '{_local(image)}' was not found")
        dtype_link = params.get("diskType", "")
        if dtype_link:
            m = re.fullmatch(r"(?:.*/)?zones/(?P<z>[^/]+)/diskTypes/(?P<t>[^/]+)", dtype_link)
            if not m or m.group("z") != zone or m.group("t") not in DISK_TYPES:
                return _error(
                    400,
                    "invalid",
                    f"Invalid value for field 'resource.disks[{i}].initializeParams.diskType': '{dtype_link}'.",
                )
            hyperdisk = m.group("t").startswith("hyperdisk-")
            if mtype.startswith(HYPERDISK_ONLY) and not hyperdisk:
                return _error(400, "badRequest", f"[{m.group('t')}] features are not compatible for creating instance.")
        return None

    def _network_error(self, zone: str, nic: dict[str, Any]) -> Response | None:
        network = nic.get("network")
        if network:
            name = network.rsplit("/", 1)[-1]
            if "/networks/" not in f"/{network}" or name not in self.networks:
                return _error(404, "notFound", f"The resource '{_local(network)}' was not found")
        subnet = nic.get("subnetwork")
        if subnet:
            m = re.search(r"regions/(?P<r>[^/]+)/subnetworks/(?P<s>[^/]+)$", subnet)
            if not m or m.group("s") not in self.subnetworks or m.group("r") != zone.rsplit("-", 1)[0]:
                return _error(404, "notFound", f"The resource '{_local(subnet)}' was not found")
        return None

    def _insert(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        zone, body = req.params["zone"], req.body or {}
        with self.lock:
            rid = req.query.get("requestId")
            if rid and rid in self.request_ids:
                return Response(200, self._public(self.operations[self.request_ids[rid]]))
            failure = self._fail_next.pop(0) if self._fail_next else None
            if failure and failure["sync"]:
                status = failure["http_status"] or 400
                return _error(status, failure["reason"], failure["message"])
            bad = self._validate(zone, body)
            if bad:
                return bad
            if (zone, body["name"]) in self.instances:
                return _error(409, "alreadyExists", f"The resource '{body['name']}' already exists")
            if failure is None and zone in self.exhausted:
                failure = {
                    "code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                    "http_status": None,
                    "quota_metric": "",
                    "message": f"The zone '{zone}' does not have enough resources available "
                    "to fulfill the request. Try a different zone, or try again later.",
                }
            inst = copy.deepcopy(body)  # the request log keeps what was sent
            inst.update(
                id=str(next(self._ids)),
                kind="compute#instance",
                zone=self._link("zones", zone),
                machineType=self._link("zones", zone, "machineTypes", body["machineType"].rsplit("/", 1)[-1]),
                selfLink=self._link("zones", zone, "instances", body["name"]),
                status="PROVISIONING",
                creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
            )
            for i, nic in enumerate(inst.get("networkInterfaces", [])):
                nic.setdefault("network", self._link("global", "networks", "default"))
                nic.update(name=f"nic{i}", networkIP=f"10.128.0.{len(self.instances) + 2}")
            op = self._new_op(zone, "insert", inst)
            self._pending[(zone, op["name"])] = {"create": inst, "failure": failure}
            if rid:
                self.request_ids[rid] = (zone, op["name"])
            return Response(200, self._public(op))

    def _finish(self, zone: str, op: dict[str, Any]) -> None:
        effect = self._pending.pop((zone, op["name"]), {})
        op.update(status="DONE", progress=100)
        failure = effect.get("failure")
        if failure:
            err: dict[str, Any] = {"code": failure["code"], "message": failure["message"]}
            if failure.get("quota_metric"):
                err["errorDetails"] = [
                    {
                        "quotaInfo": {
                            "metricName": failure["quota_metric"],
                            "limitName": failure["quota_metric"] + "-per-project",
                            "limit": 0,
                        }
                    }
                ]
            op["error"] = {"errors": [err]}
            if failure.get("http_status"):
                op["httpErrorStatusCode"] = failure["http_status"]
                op["httpErrorMessage"] = "SERVICE UNAVAILABLE"
            return
        if "create" in effect:
            inst = effect["create"]
            inst["status"] = "RUNNING"
            self.instances[(zone, inst["name"])] = inst
            op["targetId"] = inst["id"]
        if "delete" in effect:
            self.instances.pop((zone, effect["delete"]), None)

    def _op_get(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        key = (req.params["zone"], req.params["op"])
        with self.lock:
            op = self.operations.get(key)
            if op is None:
                return _error(404, "notFound", f"The resource 'operations/{key[1]}' was not found")
            if op["status"] != "DONE":
                op["_polls"] += 1
                op["status"] = "RUNNING"
                if op["_polls"] >= self.op_polls and time.monotonic() >= op["_ready_at"]:
                    self._finish(key[0], op)
            return Response(200, self._public(op))

    def _op_wait(self, req: Request) -> Response:
        """zoneOperations.wait: returns when the operation is DONE, or after `wait_cap` seconds
        (the real API's ~2 minutes) with it still RUNNING."""
        denied = self._guard(req)
        if denied:
            return denied
        key = (req.params["zone"], req.params["op"])
        deadline = time.monotonic() + self.wait_cap
        while True:
            with self.lock:
                op = self.operations.get(key)
                if op is None:
                    return _error(404, "notFound", f"The resource 'operations/{key[1]}' was not found")
                if op["status"] != "DONE":
                    op["status"] = "RUNNING"
                    if time.monotonic() >= op["_ready_at"]:
                        self._finish(key[0], op)
                if op["status"] == "DONE" or time.monotonic() >= deadline:
                    return Response(200, self._public(op))
            time.sleep(0.02)

    def _get(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        with self.lock:
            inst = self.instances.get((req.params["zone"], req.params["name"]))
            if inst is None:
                return _error(404, "notFound", f"The resource 'instances/{req.params['name']}' was not found")
            return Response(200, inst)

    def _serial(self, req: Request) -> Response:
        """instances.getSerialPortOutput: port 1 is the console the emulated VM printed on."""
        denied = self._guard(req)
        if denied:
            return denied
        port = req.query.get("port", "1")
        if port not in ("1", "2", "3", "4"):
            return _error(400, "invalid", f"Invalid value for field 'port': '{port}'. Must be between 1 and 4.")
        with self.lock:
            inst = self.instances.get((req.params["zone"], req.params["name"]))
            if inst is None:
                return _error(404, "notFound", f"The resource 'instances/{req.params['name']}' was not found")
            source = self.serial_sources.get(req.params["name"])
        contents = source() if source is not None and port == "1" else ""
        start = int(req.query.get("start", "0") or 0)
        body = {
            "kind": "compute#serialPortOutput",
            "contents": contents[start:],
            "start": str(start),
            "next": str(len(contents)),
            "selfLink": inst["selfLink"] + f"/serialPort?port={port}",
        }
        return Response(200, body)

    def _delete(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        zone, name = req.params["zone"], req.params["name"]
        with self.lock:
            inst = self.instances.get((zone, name))
            if inst is None:
                return _error(404, "notFound", f"The resource 'instances/{name}' was not found")
            inst["status"] = "STOPPING"
            op = self._new_op(zone, "delete", inst)
            self._pending[(zone, op["name"])] = {"delete": name}
            return Response(200, self._public(op))

    def _matching(self, items: list[dict[str, Any]], expr: str) -> list[dict[str, Any]] | Response:
        try:
            tests = parse_filter(expr)
        except ValueError as e:
            return _error(400, "invalid", f"Invalid list filter expression: {e}")
        return [i for i in items if all(lookup(i, path) == value for path, value in tests)]

    def _list(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        with self.lock:
            found = self._matching(
                [i for (z, _), i in self.instances.items() if z == req.params["zone"]], req.query.get("filter", "")
            )
        if isinstance(found, Response):
            return found
        return Response(200, {"kind": "compute#instanceList", "items": found})

    def _aggregated(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        items: dict[str, Any] = {}
        with self.lock:
            for zone in sorted(self.zones):
                found = self._matching(
                    [i for (z, _), i in self.instances.items() if z == zone], req.query.get("filter", "")
                )
                if isinstance(found, Response):
                    return found
                items[f"zones/{zone}"] = (
                    {"instances": found}
                    if found
                    else {"warning": {"code": "NO_RESULTS_ON_PAGE", "message": "There are no results for scope"}}
                )
        return Response(200, {"kind": "compute#instanceAggregatedList", "items": items})

    def _op_list(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        with self.lock:
            ops = [self._public(o) for (z, _), o in self.operations.items() if z == req.params["zone"]]
            found = self._matching(ops, req.query.get("filter", ""))
        if isinstance(found, Response):
            return found
        return Response(200, {"kind": "compute#operationList", "items": found})

    def _accelerator(self, zone: str, name: str) -> dict[str, Any]:
        return {
            "kind": "compute#acceleratorType",
            "name": name,
            "zone": self._link("zones", zone),
            "maximumCardsPerInstance": 8,
            "selfLink": self._link("zones", zone, "acceleratorTypes", name),
        }

    def _acc_get(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        zone, name = req.params["zone"], req.params["acc"]
        if name not in self.accelerators.get(zone, set()):
            return _error(404, "notFound", f"The resource 'acceleratorTypes/{name}' was not found")
        return Response(200, self._accelerator(zone, name))

    def _acc_list(self, req: Request) -> Response:
        denied = self._guard(req)
        if denied:
            return denied
        zone = req.params["zone"]
        items = [self._accelerator(zone, n) for n in sorted(self.accelerators.get(zone, set()))]
        return Response(200, {"kind": "compute#acceleratorTypeList", "items": items})

    def _sa_token(self, req: Request) -> Response:
        """The VM's service-account token, as the metadata server hands it out; 404 for a VM
        launched without a service account (it has no identity)."""
        if req.header("metadata-flavor") != "Google":
            return Response(403, "Missing Metadata-Flavor:Google header.")
        with self.lock:
            inst = self.instance(req.params["name"])
            if inst is None:
                return Response(404, "instance gone")
            if not inst.get("serviceAccounts"):
                return Response(404, "no service account")
        token = {"access_token": f"vm-token-{req.params['name']}", "expires_in": 3599, "token_type": "Bearer"}
        return Response(200, token)

    def startup_script(self, name: str) -> str:
        """The instance's `startup-script` metadata, as the guest agent reads and runs it."""
        inst = self.instance(name)
        assert inst is not None, f"no instance {name}"
        items = {i["key"]: i["value"] for i in inst.get("metadata", {}).get("items", [])}
        return items["startup-script"]

    def _metadata(self, req: Request) -> Response:
        if req.header("metadata-flavor") != "Google":
            return Response(403, "Missing Metadata-Flavor:Google header.")
        name, key = req.params["name"], req.params["key"]
        with self.lock:
            if self.instance(name) is None:
                return Response(404, "instance gone")
            if key == "preempted":
                return Response(200, "TRUE" if name in self.preempted else "FALSE")
            if key == "name":
                return Response(200, name)
        return Response(404, f"no metadata key {key}")


# ---------------------------------------------------------------------- validation helpers


def _catalog_machine_types() -> set[str]:
    from spotrun.catalog import bundled_offers

    return {o.instance_type for o in bundled_offers() if o.provider == "gcp"}


def _local(link: str) -> str:
    """A resource link as `projects/...` (full URLs and `global/...` forms alike)."""
    m = re.search(r"(projects/.*)$", link)
    if m:
        return m.group(1)
    return f"projects/{PROJECT}/{link.lstrip('/')}"


def _schema_error(body: dict[str, Any]) -> str | None:
    """The body as google-cloud-compute's `Instance` message parses it (unknown fields and wrong
    types refused, as the API's JSON parser does), then its enum fields against the SDK's enums."""
    import json

    from google.cloud import compute_v1
    from google.protobuf.json_format import ParseError

    try:
        compute_v1.Instance.from_json(json.dumps(body), ignore_unknown_fields=False)
    except ParseError as e:
        return f"Invalid JSON payload received. {str(e).splitlines()[0]}"
    enums = {
        "provisioningModel": compute_v1.Scheduling.ProvisioningModel,
        "onHostMaintenance": compute_v1.Scheduling.OnHostMaintenance,
        "instanceTerminationAction": compute_v1.Scheduling.InstanceTerminationAction,
    }
    for field, enum in enums.items():
        value = body.get("scheduling", {}).get(field)
        if value is not None and (value not in enum.__members__ or value.startswith("UNDEFINED")):
            return f"Invalid value for field 'resource.scheduling.{field}': '{value}'"
    return None


# ---------------------------------------------------------------------- filters


def parse_filter(expr: str) -> list[tuple[str, str]]:
    """`a.b = "v" AND c="w"` (also `(a = v)` and `a eq v`) -> [("a.b", "v"), ("c", "w")]."""
    tests = []
    for clause in re.split(r"\s+AND\s+", expr.strip(), flags=re.IGNORECASE) if expr.strip() else []:
        clause = clause.strip().strip("()").strip()
        m = re.fullmatch(r'([A-Za-z][\w.-]*)\s*(?:=|\beq\b)\s*"?([^"]*)"?', clause)
        if not m:
            raise ValueError(clause)
        tests.append((m.group(1), m.group(2)))
    return tests


def lookup(obj: dict[str, Any], path: str) -> str | None:
    head, _, rest = path.partition(".")
    if head == "labels":
        return obj.get("labels", {}).get(rest)
    value = obj.get(head)
    return None if value is None else str(value)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session", name="gce_server")
def gce_server_fixture() -> Iterator[FakeGCE]:
    server = FakeGCE().start()
    try:
        yield server  # type: ignore[misc]
    finally:
        server.stop()


@pytest.fixture(name="gce")
def gce_fixture(gce_server: FakeGCE) -> Iterator[FakeGCE]:
    """The session's fake GCE, emptied before and after the test."""
    gce_server.reset()
    try:
        yield gce_server
    finally:
        gce_server.reset()


def gce_credentials(token: str = GOOD_TOKEN) -> Any:
    """Static OAuth credentials the fake accepts (any other token gets 401; `forbidden...` 403)."""
    from google.oauth2.credentials import Credentials

    return Credentials(token=token)
