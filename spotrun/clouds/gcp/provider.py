"""Google Compute Engine: Spot VMs that boot the spotrun Agent from their startup script.

What a launch sends (one `instances.insert`, nothing else is created):

* `scheduling`: provisioning model SPOT, termination action DELETE (a preempted VM is deleted, so
  its boot disk stops costing money), host maintenance TERMINATE and no automatic restart (GPU VMs
  cannot live-migrate; the controller relaunches elsewhere from the last checkpoint instead).
  On-demand launches use the STANDARD model with the same maintenance settings.
* GPUs: N1 machine types get `guestAccelerators` (T4, V100, P100, P4, K80); the
  accelerator-optimized families (a2, a3, g2, ...) have their GPUs built into the machine type.
* a Deep Learning VM image (CUDA and the driver installer) unless `image` says otherwise.
* metadata `startup-script` = `render_bootstrap_script(boot)` with a GCP notice watcher.
* labels `spotrun-job` / `spotrun-attempt`, which `list_owned` filters on.
* a network interface without an access config: no external IP, no firewall rule is touched.
  The VM reaches PyPI through Cloud NAT and the bucket through Private Google Access.
* the job's own service account (created at its first launch, bound on the store bucket to its
  job prefix and read-only `agent/`, `data/`; deleted by `release_job`: clouds/gcp/identity.py),
  or the configured `service_account` for a job with `${VAR}` secrets or a store off GCS; only the
  storage scope.

Idempotency: the instance name and the insert's `requestId` are both derived from the client token,
so a repeated launch returns the instance the first call started.

Known SDK traps handled here: the `ExtendedOperation` an insert returns polls through its own
zone-operations client that ignores our endpoint, so operations are polled with our own client;
and an operation that carries `error` without `httpErrorStatusCode` does not raise, so `op.error`
is always read.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from spotrun.clock import SYSTEM_CLOCK, Clock
from spotrun.clouds.base import (
    AuthError,
    BadRequest,
    Boot,
    Instance,
    InstanceState,
    InstanceStatus,
    NoCapacity,
    Provider,
    ProviderError,
    QuotaExceeded,
    Throttled,
    render_bootstrap_script,
)
from spotrun.clouds.egress import add_missing
from spotrun.clouds.gcp.images import DEFAULT, image_for
from spotrun.clouds.gcp.network import egress_missing, ensure_deny_ingress, shape_nic

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer

T = TypeVar("T")

# Machine series whose boot disk must be Hyperdisk (they take no Persistent Disk).
HYPERDISK_ONLY = ("a3-ultragpu-", "a4-", "a4x-")


def boot_disk_type(machine_type: str) -> str:
    return "hyperdisk-balanced" if machine_type.startswith(HYPERDISK_ONLY) else "pd-balanced"


DEFAULT_IMAGE = DEFAULT  # the Deep Learning VM image family of the image table (clouds/gcp/images.py)
DEFAULT_IMDS = "http://metadata.google.internal"
STORAGE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
LABEL_JOB = "spotrun-job"
LABEL_ATTEMPT = "spotrun-attempt"
LABEL_TOKEN = "spotrun-token"
PREEMPTED_OP = "compute.instances.preempted"
TOKEN_NAMESPACE = uuid.UUID("5b0f3c0e-6d5e-4c8e-9a0a-2f1d7c9e8b61")

# GPU name (as in Offer.gpu) -> Compute Engine accelerator type, for the N1 family only.
N1_ACCELERATORS = {
    "T4": "nvidia-tesla-t4",
    "V100": "nvidia-tesla-v100",
    "P100": "nvidia-tesla-p100",
    "P4": "nvidia-tesla-p4",
    "K80": "nvidia-tesla-k80",
}

NO_CAPACITY_CODES = {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"}
QUOTA_CODES = {"QUOTA_EXCEEDED", "quotaExceeded"}
BAD_REQUEST_CODES = {"UNSUPPORTED_OPERATION", "invalid", "badRequest", "notFound", "RESOURCE_NOT_FOUND"}
RATE_LIMIT_CODES = {"rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"}
AUTH_CODES = {"forbidden", "insufficientPermissions", "authError", "PERMISSION_DENIED", "UNAUTHENTICATED"}
PENDING_STATES = {"PROVISIONING", "STAGING"}

# ------------------------------------------------------------------ naming


def label_value(text: str) -> str:
    """A GCE label value: lowercase letters, digits, '-' and '_', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]


def request_id(client_token: str) -> str:
    """The insert's requestId: a UUID, the same for every retry of one launch."""
    return str(uuid.uuid5(TOKEN_NAMESPACE, client_token))


def instance_name(job_id: str, attempt: int, client_token: str) -> str:
    """`spotrun-<job>-<attempt>-<8 hex of the token>`: a valid, deterministic GCE name."""
    slug = re.sub(r"[^a-z0-9-]", "-", job_id.lower()).strip("-")[:34].rstrip("-") or "job"
    return f"spotrun-{slug}-{attempt}-{uuid.uuid5(TOKEN_NAMESPACE, client_token).hex[:8]}"


def accelerator_for(offer: Offer) -> str | None:
    """The accelerator type to attach, for machine types whose GPUs are not built in."""
    if not offer.gpu or offer.gpu_count <= 0 or not offer.instance_type.startswith("n1-"):
        return None
    try:
        return N1_ACCELERATORS[offer.gpu]
    except KeyError:
        raise BadRequest(f"GPU {offer.gpu} cannot be attached to {offer.instance_type}", code="gpu") from None


# ------------------------------------------------------------------ error translation


def classify(code: str, message: str, *, http_status: int | None = None, quota_metric: str = "") -> ProviderError:
    """One Compute Engine error (an operation error code or an HTTP error reason) -> a shared error."""
    text = f"{code}: {message}" if code else message
    if code in NO_CAPACITY_CODES:
        return NoCapacity(text, code=code)
    if code in QUOTA_CODES:
        metric = (quota_metric or message).upper().replace("-", "_")
        scope = "provider" if "GPUS_ALL_REGIONS" in metric else "region"
        return QuotaExceeded(text, code=code, scope=scope)
    if code in RATE_LIMIT_CODES or http_status == 429:
        return Throttled(text, code=code or "429")
    if http_status == 401 or code in AUTH_CODES:
        return AuthError(text, code=code or str(http_status))
    if code in BAD_REQUEST_CODES or http_status in (400, 404):
        return BadRequest(text, code=code or str(http_status))
    if http_status == 403:
        return AuthError(text, code=code or "403")
    return ProviderError(text, code=code or str(http_status or ""))


def from_api_error(exc: Exception) -> ProviderError:
    """A google.api_core error raised by a call (HTTP status + `errors[].reason`)."""
    status = getattr(exc, "code", None)
    status = status if isinstance(status, int) else None
    errors = list(getattr(exc, "errors", None) or [])
    reason = ""
    for err in errors:
        if isinstance(err, dict) and err.get("reason"):
            reason = str(err["reason"])
            break
    reason = reason or str(getattr(exc, "reason", "") or "")
    return classify(reason, str(getattr(exc, "message", "") or exc), http_status=status)


def from_operation_error(op: Any) -> ProviderError | None:
    """The first error of a finished operation, or None when it succeeded."""
    if not op.error or not op.error.errors:
        return None
    first = op.error.errors[0]
    metric = ""
    for detail in first.error_details:
        if detail.quota_info and detail.quota_info.metric_name:
            metric = detail.quota_info.metric_name
    status = op.http_error_status_code or None
    return classify(first.code, first.message, http_status=status, quota_metric=metric)


# ------------------------------------------------------------------ provider


class GCPProvider(Provider):
    name = "gcp"
    boot_timeout = 600.0  # a Deep Learning VM boots in 1-2 min (GPU driver set-up included); the install ~30 s

    def __init__(
        self,
        project: str | None = None,
        *,
        image: str | None = None,
        service_account: str | None = None,
        network: str | None = None,
        subnetwork: str | None = None,
        cloud_nat: bool = False,
        disk_gb: int = 100,
        endpoint: str | None = None,
        credentials: Any = None,
        imds_endpoint: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        operation_timeout: float = 300.0,
        retries: int = 3,
    ) -> None:
        """`endpoint` (tests) points every Compute client at another server; `imds_endpoint`
        is what the Agent polls for the preemption notice and may contain `{instance}`, filled
        with the instance name (tests give each fake instance its own metadata path)."""
        self._project = project
        self.image = image or DEFAULT_IMAGE
        self.service_account = service_account
        self.network = network
        self.subnetwork = subnetwork
        self.cloud_nat = cloud_nat  # the network has Cloud NAT: VMs get no external IP (clouds/gcp/network.py)
        self.disk_gb = int(disk_gb)
        self.endpoint = endpoint
        self._credentials = credentials
        self.imds_endpoint = imds_endpoint or DEFAULT_IMDS
        self.clock = clock
        self.operation_timeout = operation_timeout
        self.retries = retries
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._accelerators: dict[tuple[str, str], bool] = {}
        self._job_accounts: dict[str, str] = {}  # job id -> its service account (made this run)
        self._placements: set[tuple[str, str]] = set()  # (region, policy name) made for gangs this run
        self._failed_inserts: dict[str, int] = {}  # client token -> inserts that failed (fresh request ids)

    # -------------------------------------------------------------- clients

    @property
    def project(self) -> str:
        if not self._project:
            import google.auth

            try:
                creds, project = google.auth.default()
            except Exception as e:  # DefaultCredentialsError, or a broken credentials file
                raise AuthError(f"no Google Cloud credentials: {e}", code="credentials") from None
            if not project:
                raise AuthError("no GCP project: set gcp.project in the job file or GOOGLE_CLOUD_PROJECT")
            self._credentials = self._credentials or creds
            self._project = project
        return self._project

    def _client(self, kind: str) -> Any:
        """One Compute client per kind, all with the same endpoint and credentials."""
        with self._lock:
            if kind not in self._clients:
                from google.cloud import compute_v1

                cls = {
                    "instances": compute_v1.InstancesClient,
                    "zone_operations": compute_v1.ZoneOperationsClient,
                    "accelerator_types": compute_v1.AcceleratorTypesClient,
                    "projects": compute_v1.ProjectsClient,
                    "firewalls": compute_v1.FirewallsClient,
                    "routers": compute_v1.RoutersClient,
                    "resource_policies": compute_v1.ResourcePoliciesClient,
                    "region_operations": compute_v1.RegionOperationsClient,
                }[kind]
                options = {"api_endpoint": self.endpoint} if self.endpoint else None
                try:
                    self._clients[kind] = cls(credentials=self._credentials, client_options=options)
                except Exception as e:  # google.auth.exceptions.DefaultCredentialsError
                    raise AuthError(f"no Google Cloud credentials: {e}", code="credentials") from None
            return self._clients[kind]

    def _call(self, fn: Callable[[], T]) -> T:
        """Run one API call; rate limits are retried with backoff, everything else translated."""
        from google.api_core import exceptions as gexc

        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except gexc.GoogleAPICallError as e:
                err = from_api_error(e)
                if isinstance(err, Throttled) and attempt < self.retries:
                    self.clock.sleep(delay)
                    delay *= 2
                    continue
                raise err from e
            except Exception as e:
                from google.auth import exceptions as authexc

                if isinstance(e, (authexc.TransportError, OSError)):  # requests raises OSError subclasses
                    raise ProviderError(f"Compute Engine unreachable: {e}", code="network") from e
                if isinstance(e, authexc.GoogleAuthError):
                    raise AuthError(f"Google credentials rejected: {e}", code="credentials") from e
                raise
        raise AssertionError("unreachable")

    # -------------------------------------------------------------- launch

    def gang_placement(self, offer: Offer, job_id: str, nodes: int) -> dict[str, str]:
        """A compact placement policy (COLLOCATED, vmCount N) for a multi-node job's nodes, created
        once per job and region; each node's insert names it in `resourcePolicies`."""
        from google.api_core import exceptions as gexc
        from google.cloud import compute_v1

        region = offer.region
        name = self._placement_name(job_id)
        policy = compute_v1.ResourcePolicy(
            name=name,
            group_placement_policy=compute_v1.ResourcePolicyGroupPlacementPolicy(
                collocation="COLLOCATED", vm_count=nodes
            ),
        )
        policies = self._client("resource_policies")
        try:
            op = self._call(
                lambda: policies.insert(project=self.project, region=region, resource_policy_resource=policy)
            )
            self._wait_region(region, op.name)
        except ProviderError as e:
            if not isinstance(e.__cause__, gexc.Conflict):  # already there: made for an earlier attempt
                raise
        with self._lock:
            self._placements.add((region, name))
        return {"resource_policy": f"projects/{self.project}/regions/{region}/resourcePolicies/{name}"}

    @staticmethod
    def _placement_name(job_id: str) -> str:
        return f"spotrun-{label_value(job_id)}"[:63].rstrip("-")

    def launch(
        self, offer: Offer, *, spot: bool, boot: Boot, client_token: str, placement: dict[str, str] | None = None
    ) -> Instance:
        from spotrun.clouds.gcp import identity

        identity.require(self.service_account)  # no identity: the VM could not read the store
        account = self._job_account(boot)
        zone = offer.zone
        if not zone:
            raise BadRequest(f"GCP offer {offer.key} has no zone", code="zone")
        name = instance_name(boot.job_id, boot.attempt, client_token)
        accelerator = accelerator_for(offer)
        if accelerator:
            self._require_accelerator(zone, accelerator)
        notice = {"kind": "gcp", "endpoint": self.imds_endpoint.replace("{instance}", name)}
        body = self.instance_body(
            offer,
            spot=spot,
            boot=dataclasses.replace(boot, notice=notice),
            name=name,
            accelerator=accelerator,
            token=client_token,
            service_account=account,
        )
        ensure_deny_ingress(self)  # before any VM of this network gets an external IP
        if placement and placement.get("resource_policy"):  # a multi-node gang: its nodes close together
            body.resource_policies = [placement["resource_policy"]]
        instances = self._client("instances")
        from google.api_core import exceptions as gexc
        from google.cloud import compute_v1

        # GCE answers a repeated request_id with the earlier operation: after a failed insert (e.g.
        # rate limited) a retry must send a new one, or it only gets the old failure back.
        tries = self._failed_inserts.get(client_token, 0)
        rid = request_id(client_token if tries == 0 else f"{client_token}:retry{tries}")
        request = compute_v1.InsertInstanceRequest(
            project=self.project, zone=zone, instance_resource=body, request_id=rid
        )
        try:
            op = self._call(lambda: instances.insert(request=request))
        except ProviderError as e:
            if isinstance(e.__cause__, gexc.Conflict):  # the same name: an earlier try of this launch
                return self._adopt(zone, name, client_token, spot)
            if account and isinstance(e, BadRequest) and account in str(e):
                # IAM is eventually consistent: a service account made seconds ago may not be visible to
                # Compute Engine yet. A passing fault (retried), not a bad offer.
                self._failed_inserts[client_token] = tries + 1
                raise Throttled(f"the job's new service account is not visible yet: {e}", code="iamPropagation") from e
            raise
        done = self._wait(zone, op.name)
        failure = from_operation_error(done)
        if failure is not None:
            self._delete_quietly(zone, name)  # never leave half of a failed insert behind
            self._failed_inserts[client_token] = tries + 1
            raise failure
        return self._adopt(zone, name, client_token, spot)

    def instance_body(
        self,
        offer: Offer,
        *,
        spot: bool,
        boot: Boot,
        name: str,
        accelerator: str | None,
        token: str,
        service_account: str | None = None,
    ) -> Any:
        """The `Instance` resource one launch sends (the VM runs as `service_account`, else the
        configured one)."""
        from google.cloud import compute_v1

        zone = offer.zone
        scheduling = compute_v1.Scheduling(
            provisioning_model="SPOT" if spot else "STANDARD",
            on_host_maintenance="TERMINATE",
            automatic_restart=False,
        )
        if spot:
            scheduling.instance_termination_action = "DELETE"
        nic = compute_v1.NetworkInterface()  # its external IP: shape_nic below
        if self.network:
            nic.network = self.network
        if self.subnetwork:
            nic.subnetwork = self.subnetwork
        metadata = compute_v1.Metadata(
            items=[
                compute_v1.Items(key="startup-script", value=render_bootstrap_script(boot)),
                compute_v1.Items(key="install-nvidia-driver", value="True"),
                compute_v1.Items(key="block-project-ssh-keys", value="TRUE"),
                compute_v1.Items(key="spotrun-job", value=boot.job_id),
            ]
        )
        disk = compute_v1.AttachedDisk(
            boot=True,
            auto_delete=True,
            initialize_params=compute_v1.AttachedDiskInitializeParams(
                source_image=image_for(offer, self.image),
                disk_size_gb=self.disk_gb,
                disk_type=f"zones/{zone}/diskTypes/{boot_disk_type(offer.instance_type)}",
            ),
        )
        instance = compute_v1.Instance(
            name=name,
            machine_type=f"zones/{zone}/machineTypes/{offer.instance_type}",
            scheduling=scheduling,
            disks=[disk],
            network_interfaces=[nic],
            metadata=metadata,
            labels={
                **boot.labels,  # the spec's labels (validated to GCP's rules; 'spotrun*' keys are reserved)
                LABEL_JOB: label_value(boot.job_id),
                LABEL_ATTEMPT: str(boot.attempt),
                LABEL_TOKEN: label_value(request_id(token)),
            },
        )
        shape_nic(self, instance)  # egress: an ephemeral external IP, no ingress (clouds/gcp/network.py)
        if accelerator:
            instance.guest_accelerators = [
                compute_v1.AcceleratorConfig(
                    accelerator_type=f"zones/{zone}/acceleratorTypes/{accelerator}",
                    accelerator_count=offer.gpu_count,
                )
            ]
        email = service_account or self.service_account
        if email:
            scopes = [STORAGE_SCOPE, *_secrets_scope(boot)]
            instance.service_accounts = [compute_v1.ServiceAccount(email=email, scopes=scopes)]
        return instance

    def _job_account(self, boot: Boot) -> str | None:
        """The job's own service account, created and bound on the bucket once per job (per-job
        scoping: clouds/gcp/identity.py); None where the configured account is used instead."""
        from spotrun.clouds.gcp import identity

        if not identity.uses_job_account(boot):
            return None
        with self._lock:
            if boot.job_id in self._job_accounts:
                return self._job_accounts[boot.job_id]
        email = identity.ensure_job_account(self, boot)
        with self._lock:
            self._job_accounts[boot.job_id] = email
        return email

    def release_job(self, job_id: str) -> None:
        """The job's service account leaves the bucket policy and the project."""
        from spotrun.clouds.gcp import identity

        with self._lock:
            self._job_accounts.pop(job_id, None)
            name = self._placement_name(job_id)
            placements = sorted(p for p in self._placements if p[1] == name)
            self._placements.difference_update(placements)
        identity.release_job_account(self, job_id)
        for region, policy in placements:
            self._delete_placement(region, policy)

    def _delete_placement(self, region: str, name: str) -> None:
        """A gang's compact placement policy, deleted once its nodes are (free, but clutter; one a
        restarted controller did not make itself is left, as on AWS). Never fails the job's end."""
        from google.api_core import exceptions as gexc

        policies = self._client("resource_policies")
        try:
            op = self._call(lambda: policies.delete(project=self.project, region=region, resource_policy=name))
            self._wait_region(region, op.name)
        except ProviderError as e:
            if not isinstance(e.__cause__, gexc.NotFound):
                log.warning("cannot delete placement policy %s in %s: %s", name, region, e)

    def _require_accelerator(self, zone: str, accelerator: str) -> None:
        """An accelerator the zone does not have is a bad offer, not a capacity problem."""
        key = (zone, accelerator)
        if key not in self._accelerators:
            client = self._client("accelerator_types")
            try:
                self._call(lambda: client.get(project=self.project, zone=zone, accelerator_type=accelerator))
                self._accelerators[key] = True
            except BadRequest:
                self._accelerators[key] = False
        if not self._accelerators[key]:
            raise BadRequest(f"accelerator {accelerator} is not offered in {zone}", code="acceleratorType")

    def _wait_region(self, region: str, operation: str) -> None:
        """Wait for a region operation (a placement policy's insert or delete)."""
        ops = self._client("region_operations")
        self._call(lambda: ops.wait(project=self.project, region=region, operation=operation, timeout=150))

    def _wait(self, zone: str, operation: str) -> Any:
        """Poll a zone operation until DONE with our own client (same endpoint, same credentials)."""
        from google.cloud import compute_v1

        ops = self._client("zone_operations")
        deadline = self.clock.now() + self.operation_timeout
        while True:
            # `wait` returns when the operation is DONE or after at most ~2 minutes, server side
            op = self._call(lambda: ops.wait(project=self.project, zone=zone, operation=operation, timeout=150))
            if op.status == compute_v1.Operation.Status.DONE:
                return op
            if self.clock.now() >= deadline:
                raise ProviderError(f"operation {operation} in {zone} not done after {self.operation_timeout:.0f}s")
            self.clock.sleep(1.0)

    def _adopt(self, zone: str, name: str, token: str, spot: bool) -> Instance:
        """The instance `name`, if it is the one this launch (same token) created."""
        client = self._client("instances")
        found = self._call(lambda: client.get(project=self.project, zone=zone, instance=name))
        if found.labels.get(LABEL_TOKEN) != label_value(request_id(token)):
            raise BadRequest(f"instance {name} exists in {zone} and was not started by this launch", code="conflict")
        return self._to_instance(found, zone, launched_at=self.clock.now(), spot=spot)

    def _to_instance(self, found: Any, zone: str, *, launched_at: float, spot: bool | None = None) -> Instance:
        labels = dict(found.labels)
        if spot is None:
            spot = found.scheduling.provisioning_model == "SPOT"
        return Instance(
            provider=self.name,
            instance_id=found.name,
            region=zone.rsplit("-", 1)[0],
            zone=zone,
            instance_type=found.machine_type.rsplit("/", 1)[-1],
            spot=spot,
            job_id=_metadata(found, "spotrun-job") or labels.get(LABEL_JOB, ""),
            attempt=int(labels.get(LABEL_ATTEMPT, "0") or 0),
            launched_at=launched_at,
            details={
                "project": self.project,
                "zone": zone,
                "id": str(found.id),
                "name": found.name,
                "self_link": found.self_link,
            },
        )

    # -------------------------------------------------------------- poll / terminate / list

    def console_output(self, instance: Instance) -> str:
        """Compute Engine's serial port 1 output (the startup script's output is logged there);
        "" once the VM is deleted."""
        from google.api_core import exceptions as gexc
        from google.cloud import compute_v1

        client = self._client("instances")
        request = compute_v1.GetSerialPortOutputInstanceRequest(
            project=self.project, zone=instance.zone, instance=instance.instance_id, port=1
        )
        try:
            found = self._call(lambda: client.get_serial_port_output(request=request))
        except BadRequest as e:
            if isinstance(e.__cause__, gexc.NotFound):
                return ""
            raise
        return found.contents or ""

    def poll(self, instance: Instance) -> InstanceState:
        from google.api_core import exceptions as gexc

        zone = instance.zone
        client = self._client("instances")
        try:
            found = self._call(lambda: client.get(project=self.project, zone=zone, instance=instance.instance_id))
        except BadRequest as e:
            if not isinstance(e.__cause__, gexc.NotFound):
                raise
            if self._was_preempted(instance):
                return InstanceState(InstanceStatus.PREEMPTED, reason="spot VM preempted and deleted")
            return InstanceState(InstanceStatus.TERMINATED, reason="instance deleted")
        if str(found.id) != instance.details.get("id", str(found.id)):
            return InstanceState(InstanceStatus.TERMINATED, reason="instance replaced by another of the same name")
        status = found.status
        if status in PENDING_STATES:
            return InstanceState(InstanceStatus.PENDING, reason=status.lower())
        if status == "RUNNING":
            return InstanceState(InstanceStatus.RUNNING)
        if status in ("STOPPING", "TERMINATED", "SUSPENDING", "SUSPENDED") and self._was_preempted(instance):
            if status == "STOPPING":  # inside the 30 s notice: the Agent is still uploading
                return InstanceState(InstanceStatus.RUNNING, reason="preemption notice")
            return InstanceState(InstanceStatus.PREEMPTED, reason="spot VM preempted")
        if status == "STOPPING":
            return InstanceState(InstanceStatus.RUNNING, reason="stopping")
        return InstanceState(InstanceStatus.TERMINATED, reason=f"instance {status.lower()}")

    def _was_preempted(self, instance: Instance) -> bool:
        """Is there a `compute.instances.preempted` operation for this very instance?"""
        from google.cloud import compute_v1

        ops = self._client("zone_operations")
        condition = f'operationType="{PREEMPTED_OP}"'
        if instance.details.get("self_link"):
            condition += f' AND targetLink="{instance.details["self_link"]}"'
        request = compute_v1.ListZoneOperationsRequest(project=self.project, zone=instance.zone, filter=condition)
        found = self._call(lambda: list(ops.list(request=request)))
        want_id = instance.details.get("id")  # a later VM may reuse the name: match the id too
        for op in found:
            same = str(op.target_id) == want_id if want_id else op.target_link.endswith(f"/{instance.instance_id}")
            if same:
                return True
        return False

    def terminate(self, instance: Instance) -> None:
        self._delete_quietly(instance.zone, instance.instance_id, instance.details.get("id"))

    def _delete_quietly(self, zone: str, name: str, instance_id: str | None = None) -> None:
        """Delete if it exists (idempotent); only the instance with `instance_id` when given."""
        from google.api_core import exceptions as gexc

        client = self._client("instances")
        try:
            if instance_id:
                found = self._call(lambda: client.get(project=self.project, zone=zone, instance=name))
                if str(found.id) != instance_id:
                    return
            op = self._call(lambda: client.delete(project=self.project, zone=zone, instance=name))
        except BadRequest as e:
            if isinstance(e.__cause__, gexc.NotFound):
                return
            raise
        self._wait(zone, op.name)

    def list_owned(self, job_id: str) -> list[Instance]:
        from google.cloud import compute_v1

        client = self._client("instances")
        label_filter = f'labels.{LABEL_JOB}="{label_value(job_id)}"'
        request = compute_v1.AggregatedListInstancesRequest(project=self.project, filter=label_filter)
        scopes = self._call(lambda: list(client.aggregated_list(request=request)))  # pages fetched inside
        owned = []
        for scope, listing in scopes:
            for found in listing.instances:
                if _metadata(found, "spotrun-job") not in (None, job_id):
                    continue  # a different job whose id maps to the same label value
                zone = scope.rsplit("/", 1)[-1]
                owned.append(self._to_instance(found, zone, launched_at=0.0))
        return owned

    def check(self) -> dict[str, Any]:
        from spotrun.clouds.gcp import identity

        missing: list[str] = []
        try:
            projects = self._client("projects")
            found = self._call(lambda: projects.get(project=self.project))
        except ProviderError as e:
            return {"provider": self.name, "usable": False, "detail": str(e), "missing": [str(e)]}
        missing += identity.check_items(self)
        detail = f"project {found.name}"
        result = {"provider": self.name, "usable": not missing, "detail": detail, "missing": missing}
        return add_missing(result, egress_missing(self))


def _secrets_scope(boot: Boot) -> list[str]:
    """A job with `${VAR}` secrets reads them from Secret Manager, which takes only this scope."""
    from spotrun.clouds.gcp.secrets import SECRETS_SCOPE
    from spotrun.clouds.secrets import SECRETS_REF_ENV

    return [SECRETS_SCOPE] if SECRETS_REF_ENV in boot.env else []


def _metadata(found: Any, key: str) -> str | None:
    for item in found.metadata.items:
        if item.key == key:
            return item.value
    return None
