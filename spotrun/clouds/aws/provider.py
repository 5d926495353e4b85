"""AWS EC2: spot (or on-demand) GPU instances that boot the spotrun Agent.

A launch, in order (each step idempotent, so a retried launch is safe):

1. looks for an instance already tagged with this launch's client token, and passes the token to
   EC2 as `ClientToken` too: a retried call returns that instance, never a second one;
2. gets the image, network, no-ingress security group and instance profile (`aws_resources`);
3. calls RunInstances (`run_request`): spot market options (one-time, terminate on interruption,
   MaxPrice only when configured) or on-demand, the root disk size, IMDSv2 only, tags
   `spotrun:job`/`spotrun:attempt`/`spotrun:token` on the instance and its volumes, and user-data =
   the bootstrap script with the boot record (notice kind "aws"). No AWS secret is ever part of the
   request: instances get their rights from the instance profile, and a launch whose user-data
   looks like it carries a credential is refused.

`poll` reads the instance's state (`Server.SpotInstanceTermination` -> PREEMPTED) and the Agent's
exit record in the store. Errors become the shared provider errors (`aws_api.translate_error`),
throttling is retried with bounded backoff. boto3 is imported only inside methods and honours
`AWS_ENDPOINT_URL`, which is how the tests run all of this against moto's server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from spotrun.clock import SYSTEM_CLOCK, Clock
from spotrun.clouds.aws.api import PERMISSION_CODES, AWSApi, redact
from spotrun.clouds.aws.images import ami_choice
from spotrun.clouds.aws.network import egress_missing, with_public_ip
from spotrun.clouds.aws.resources import DLAMI_NAME_PATTERNS, DLAMI_PARAMETER, TAG_JOB, LaunchResources
from spotrun.clouds.base import (
    AuthError,
    BadRequest,
    Boot,
    Instance,
    InstanceState,
    InstanceStatus,
    Provider,
    ProviderError,
    render_bootstrap_script,
)
from spotrun.clouds.egress import add_missing

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer
    from spotrun.clouds.store import Store

log = logging.getLogger(__name__)

DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
TAG_ATTEMPT = "spotrun:attempt"
TAG_TOKEN = "spotrun:token"
USER_DATA_LIMIT = 16 * 1024  # EC2's limit on user-data, before base64
SPOT_TERMINATION_CODES = {"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown"}
FAILED_STATE_CODES = {
    "Server.InternalError",
    "Server.InsufficientInstanceCapacity",
    "Client.InternalError",
    "Client.VolumeLimitExceeded",
    "Client.InvalidSnapshot.NotFound",
}
LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
NOT_FOUND_GRACE_S = 120.0  # EC2's API is eventually consistent right after a launch
_SECRET_WORDS = re.compile(r"AWS_SECRET|aws_secret_access_key|AWS_SESSION_TOKEN", re.IGNORECASE)
# Spot vCPU quotas (service-quotas codes), reported by check() as hints.
SPOT_QUOTAS = {
    "L-7212CCBC": "All P Spot Instance Requests (vCPUs)",
    "L-3819A6DF": "All G and VT Spot Instance Requests (vCPUs)",
    "L-34B43A08": "All Standard Spot Instance Requests (vCPUs)",
}


def _tags(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or []}


class AWSProvider(Provider):
    name = "aws"
    takes_max_price = True
    boot_timeout = 600.0  # a Deep Learning AMI boots in 1-3 min; the Agent's install takes ~30 s more

    @classmethod
    def options_from_spec(cls, spec: Any) -> dict[str, Any]:
        """The section's options, plus its own store (the instance profile is scoped to it)."""
        options = super().options_from_spec(spec)
        if spec.aws is not None and spec.aws.store:
            options["store_url"] = spec.aws.store
        return options

    def __init__(
        self,
        region: str | None = None,
        ami: str | None = None,
        instance_profile: str | None = None,
        subnet_id: str | None = None,
        security_group_id: str | None = None,
        store_url: str | None = None,
        imds_endpoint: str | None = None,
        session: Any = None,
        clock: Clock = SYSTEM_CLOCK,
        *,
        disk_gb: float = 100,
        max_price: float | None = None,
        regions: list[str] | None = None,
        ami_parameter: str = DLAMI_PARAMETER,
        ami_name_patterns: tuple[str, ...] = DLAMI_NAME_PATTERNS,
        subnet_nat: bool = False,
        max_attempts: int = 6,
        backoff_base: float = 0.5,
        backoff_cap: float = 20.0,
    ) -> None:
        """`region` is the home region (where `subnet_id`/`security_group_id` live; offers carry
        their own region). `store_url` lets `poll` read exit records (else the launch's store is
        used). `max_price` (USD/hour) caps spot bids: without it EC2 charges the spot price, up
        to on-demand. `regions`: where `list_owned` looks besides the regions launched in; None (the
        default) means every region enabled in the account, found on the first sweep -- what a
        restarted controller needs to find an instance a previous run left anywhere."""
        self.region = region
        self.store_url = store_url
        self.imds_endpoint = imds_endpoint or DEFAULT_IMDS_ENDPOINT
        self.clock = clock
        self.disk_gb = math.ceil(disk_gb)
        self.max_price = max_price
        self.api = AWSApi(
            session,
            region=region,
            clock=clock,
            max_attempts=max_attempts,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
        )
        self.resources = LaunchResources(
            self.api,
            ami=ami,
            instance_profile=instance_profile,
            subnet_id=subnet_id,
            security_group_id=security_group_id,
            ami_parameter=ami_parameter,
            ami_name_patterns=ami_name_patterns,
            subnet_nat=subnet_nat,
        )
        self._regions: set[str] = {r for r in [region, *(regions or [])] if r}
        self._launched_regions: set[str] = set()
        self._placement_groups: set[tuple[str, str]] = set()  # (region, name) made for a gang
        self._discover_regions = regions is None  # sweep every enabled region once, on the first list_owned
        self._stores: dict[str, Store] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ launch

    def _check_no_secrets(self, text: str) -> None:
        if redact(text, self.api.secrets()) != text or _SECRET_WORDS.search(text):
            raise BadRequest(
                "refusing to launch: the user-data would carry AWS credentials; instances get their"
                " rights from the instance profile, so remove keys from the job's environment",
                code="SecretInUserData",
            )

    def run_request(
        self,
        offer: Offer,
        *,
        spot: bool,
        boot: Boot,
        client_token: str,
        image: tuple[str, str],
        subnet_id: str | None,
        security_group_id: str,
        instance_profile: dict[str, str] | None,
        placement_group: str | None = None,
    ) -> dict[str, Any]:
        """The RunInstances parameters (pure: no AWS call)."""
        user_data = render_bootstrap_script(boot)
        if len(user_data.encode()) > USER_DATA_LIMIT:
            raise BadRequest(f"user-data is {len(user_data)} bytes, over EC2's 16 KB", code="UserDataTooLarge")
        self._check_no_secrets(user_data + "\n" + json.dumps(asdict(boot)))  # the boot record is base64 in there
        tags = [
            {"Key": "Name", "Value": f"spotrun-{boot.job_id}-{boot.attempt}"},
            {"Key": TAG_JOB, "Value": boot.job_id},
            {"Key": TAG_ATTEMPT, "Value": str(boot.attempt)},
            {"Key": TAG_TOKEN, "Value": client_token},
            *({"Key": k, "Value": v} for k, v in sorted(boot.labels.items())),  # the spec's labels
        ]
        request: dict[str, Any] = {
            "ImageId": image[0],
            "InstanceType": offer.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": client_token,
            "UserData": user_data,
            "InstanceInitiatedShutdownBehavior": "terminate",  # a shutdown inside never leaves a stopped VM
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 2},
            "BlockDeviceMappings": [
                {
                    "DeviceName": image[1],
                    "Ebs": {"VolumeSize": self.disk_gb, "VolumeType": "gp3", "DeleteOnTermination": True},
                }
            ],
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        request["SecurityGroupIds"] = [security_group_id]
        if subnet_id:
            request["SubnetId"] = subnet_id
        if offer.zone:
            request["Placement"] = {"AvailabilityZone": offer.zone}
        if placement_group:  # a multi-node gang: its nodes close together (spotrun/control/gang.py)
            request.setdefault("Placement", {})["GroupName"] = placement_group
        if instance_profile:
            request["IamInstanceProfile"] = instance_profile
        if spot:
            options: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
            if self.max_price is not None:
                options["MaxPrice"] = f"{self.max_price:.6f}"
            request["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
        return request

    def _run_instances(self, region: str, request: dict[str, Any], *, fresh_profile: bool) -> dict[str, Any]:
        """RunInstances; a just-created instance profile takes a few seconds to be usable by EC2."""
        ec2 = self.api.client("ec2", region)
        tries = 8 if fresh_profile else 1
        for attempt in range(tries):
            try:
                return self.api.call(ec2.run_instances, **request)["Instances"][0]
            except BadRequest as exc:
                if attempt + 1 < tries and "iaminstanceprofile" in str(exc).lower():
                    self.clock.sleep(2.0 * (attempt + 1))
                    continue
                raise
        raise AssertionError("unreachable")

    def _by_token(self, region: str, client_token: str) -> dict[str, Any] | None:
        ec2 = self.api.client("ec2", region)
        pages = self.api.call(ec2.describe_instances, Filters=[{"Name": f"tag:{TAG_TOKEN}", "Values": [client_token]}])
        found = [i for r in pages["Reservations"] for i in r["Instances"]]
        return found[0] if found else None

    def _to_instance(self, raw: dict[str, Any], region: str, extra: dict[str, Any] | None = None) -> Instance:
        tags = _tags(raw.get("Tags"))
        launched = raw.get("LaunchTime")
        return Instance(
            provider=self.name,
            instance_id=raw["InstanceId"],
            region=region,
            zone=raw.get("Placement", {}).get("AvailabilityZone", ""),
            instance_type=raw.get("InstanceType", ""),
            spot=raw.get("InstanceLifecycle") == "spot",
            job_id=tags.get(TAG_JOB, ""),
            attempt=int(tags.get(TAG_ATTEMPT, "0") or 0),
            launched_at=launched.timestamp() if launched is not None else self.clock.now(),
            details={"image_id": raw.get("ImageId", ""), "client_token": tags.get(TAG_TOKEN, ""), **(extra or {})},
        )

    # ------------------------------------------------------------------ Provider

    def gang_placement(self, offer: Offer, job_id: str, nodes: int) -> dict[str, str]:
        """A cluster placement group for a multi-node job's nodes (created once per job and region)."""
        ec2 = self.api.client("ec2", offer.region)
        name = f"spotrun-{job_id}"[:255]
        try:
            self.api.call(ec2.create_placement_group, GroupName=name, Strategy="cluster")
        except ProviderError as exc:
            if exc.code != "InvalidPlacementGroup.Duplicate":
                raise
        with self._lock:
            self._placement_groups.add((offer.region, name))
        return {"placement_group": name}

    def launch(
        self, offer: Offer, *, spot: bool, boot: Boot, client_token: str, placement: dict[str, str] | None = None
    ) -> Instance:
        region = offer.region
        token = _ec2_token(client_token)
        with self._lock:
            self._regions.add(region)
            self._launched_regions.add(region)
        extra = {"store_url": boot.store_url, "job_prefix": boot.job_prefix}
        existing = self._by_token(region, token)
        if existing is not None:
            log.info("launch %s already done: %s", client_token, existing["InstanceId"])
            return self._to_instance(existing, region, extra)
        image = self.resources.image(
            region, **ami_choice(offer, self.resources.ami_parameter, custom_ami=bool(self.resources.ami))
        )
        vpc_id, subnet_id = self.resources.network(region, offer.zone)
        group_id = self.resources.security_group(region, vpc_id)
        profile, fresh = self.resources.instance_profile(boot)
        boot = replace(boot, notice={"kind": "aws", "endpoint": self.imds_endpoint})
        request = self.run_request(
            offer,
            spot=spot,
            boot=boot,
            client_token=token,
            image=image,
            subnet_id=subnet_id,
            security_group_id=group_id,
            instance_profile=profile,
            placement_group=(placement or {}).get("placement_group"),
        )
        configured = bool(self.resources.subnet_id) and region == self.resources._home_region()
        request = with_public_ip(request, subnet_id=subnet_id, configured=configured, nat=self.resources.subnet_nat)
        raw = self._run_instances(region, request, fresh_profile=fresh)
        extra.update(security_group_id=group_id, subnet_id=raw.get("SubnetId") or subnet_id or "")
        if profile:
            extra["instance_profile"] = next(iter(profile.values()))
        instance = self._to_instance(raw, region, extra)
        # RunInstances echoes what was asked; fill what a fresh response may lack
        instance.job_id, instance.attempt, instance.spot = boot.job_id, boot.attempt, spot
        instance.launched_at = self.clock.now()
        return instance

    def _store(self, instance: Instance) -> Store | None:
        url = self.store_url or instance.details.get("store_url")
        if not url:
            return None
        with self._lock:
            if url not in self._stores:
                from spotrun.clouds.aws.store import S3Store
                from spotrun.clouds.store import open_store

                # an S3 store shares this provider's session (credentials, endpoint, loaded models)
                s3 = url.startswith("s3://")
                self._stores[url] = S3Store.from_url(url, session=self.api.session) if s3 else open_store(url)
            return self._stores[url]

    def _exit_record(self, instance: Instance) -> dict[str, Any] | None:
        """The Agent's `attempts/<n>/exit` record, if it wrote one."""
        from spotrun.clouds.store import NotFound, StoreError, job_prefix

        store = self._store(instance)
        if store is None:
            return None
        prefix = instance.details.get("job_prefix") or job_prefix(instance.job_id)
        from spotrun.checkpoint.format import loads_bounded

        try:
            record = loads_bounded(store.get_bytes(f"{prefix}/attempts/{instance.attempt}/exit"), max_depth=16)
        except NotFound:
            return None
        except (StoreError, ValueError) as exc:
            log.warning("cannot read the exit record of %s: %s", instance.instance_id, exc)
            return None
        code = record.get("code") if isinstance(record, dict) else "not an object"
        if code is not None and type(code) is not int:  # written beside untrusted code: typed or ignored
            log.warning("malformed exit record of %s ignored", instance.instance_id)
            return None
        return record  # type: ignore[return-value]

    def poll(self, instance: Instance) -> InstanceState:
        ec2 = self.api.client("ec2", instance.region)
        try:
            found = self.api.call(ec2.describe_instances, InstanceIds=[instance.instance_id])["Reservations"]
            raw = found[0]["Instances"][0] if found else None
        except BadRequest as exc:
            if exc.code != "InvalidInstanceID.NotFound":
                raise
            raw = None
        if raw is None:
            if self.clock.now() - instance.launched_at < NOT_FOUND_GRACE_S:
                return InstanceState(InstanceStatus.PENDING, reason="not visible in the EC2 API yet")
            return self._ended(instance, InstanceStatus.TERMINATED, "the instance no longer exists")
        state = raw["State"]["Name"]
        reason = raw.get("StateReason") or {}
        code = reason.get("Code", "")
        record = self._exit_record(instance)
        if record is not None and (code not in SPOT_TERMINATION_CODES or record.get("reason") == "completed"):
            return self._from_record(record)  # the Agent had its say (even if EC2 then took it back)
        if code in SPOT_TERMINATION_CODES:
            return InstanceState(InstanceStatus.PREEMPTED, reason=reason.get("Message") or code)
        if state == "pending":
            return InstanceState(InstanceStatus.PENDING)
        if state == "running":
            return InstanceState(InstanceStatus.RUNNING)
        if code in FAILED_STATE_CODES:
            return InstanceState(InstanceStatus.FAILED, reason=reason.get("Message") or code)
        return InstanceState(InstanceStatus.TERMINATED, reason=reason.get("Message") or code or state)

    def _ended(self, instance: Instance, status: InstanceStatus, reason: str) -> InstanceState:
        record = self._exit_record(instance)
        return self._from_record(record) if record is not None else InstanceState(status, reason=reason)

    @staticmethod
    def _from_record(record: dict[str, Any]) -> InstanceState:
        """The Agent's exit record: "preempted" (it saved and stopped on a notice) or how the
        workload ended ("completed", "failed", ...), with the workload's exit code."""
        code = record.get("code")
        exit_code = int(code) if code is not None else None
        why = str(record.get("reason", ""))
        if why == "preempted":
            return InstanceState(
                InstanceStatus.PREEMPTED, exit_code=exit_code, reason="preempted: the Agent saved and stopped"
            )
        return InstanceState(InstanceStatus.EXITED, exit_code=exit_code, reason=why)

    def console_output(self, instance: Instance) -> str:
        """EC2's GetConsoleOutput (the serial console, where cloud-init prints the bootstrap's output;
        EC2 keeps it for a while after the instance terminated)."""
        ec2 = self.api.client("ec2", instance.region)
        found = self.api.call(ec2.get_console_output, InstanceId=instance.instance_id, Latest=True)
        return str(found.get("Output") or "")

    def terminate(self, instance: Instance) -> None:
        ec2 = self.api.client("ec2", instance.region)
        try:
            self.api.call(ec2.terminate_instances, InstanceIds=[instance.instance_id])
        except BadRequest as exc:
            if exc.code != "InvalidInstanceID.NotFound":
                raise

    def _sweep_regions(self) -> list[str]:
        if self._discover_regions:
            ec2 = self.api.client("ec2", self.api.default_region() or "us-east-1")
            found = self.api.call(ec2.describe_regions)["Regions"]  # the account's enabled regions
            with self._lock:
                self._regions.update(r["RegionName"] for r in found)
                self._discover_regions = False
        with self._lock:
            return sorted(self._regions or {self.api.default_region() or "us-east-1"})

    def list_owned(self, job_id: str) -> list[Instance]:
        regions = self._sweep_regions()
        owned: list[Instance] = []
        for region in regions:
            ec2 = self.api.client("ec2", region)
            filters = [
                {"Name": f"tag:{TAG_JOB}", "Values": [job_id]},
                {"Name": "instance-state-name", "Values": LIVE_STATES},
            ]

            def pages(ec2: Any = ec2, filters: list[dict[str, Any]] = filters) -> list[dict[str, Any]]:
                paginator = ec2.get_paginator("describe_instances")
                return [
                    i
                    for page in paginator.paginate(Filters=filters)
                    for r in page["Reservations"]
                    for i in r["Instances"]
                ]

            try:
                raws = self.api.call(pages)
            except AuthError as e:
                # A region an organisation policy denies (found by discovery, never launched in) must
                # not blind the sweep to every other region.
                if e.code not in PERMISSION_CODES or region in self._launched_regions:
                    raise
                log.info("not sweeping %s: %s", region, e)
                with self._lock:
                    self._regions.discard(region)
                continue
            owned.extend(self._to_instance(raw, region) for raw in raws)
        return owned

    def release_controller(self, store_url: str) -> None:
        """Delete the controller-host role of `store_url` (call once no host of that store runs)."""
        self.resources.release_controller(store_url)

    def release_job(self, job_id: str) -> None:
        """Delete what was created for the job alone: its instance profile and role, and the
        cluster placement groups this provider made for its gang (free on AWS, but clutter; a
        controller restarted mid-job does not know the earlier ones and leaves them)."""
        self.resources.release_job(job_id)
        with self._lock:
            groups = sorted(g for g in self._placement_groups if g[1] == f"spotrun-{job_id}"[:255])
            self._placement_groups.difference_update(groups)
        for region, name in groups:
            try:
                self.api.call(self.api.client("ec2", region).delete_placement_group, GroupName=name)
            except ProviderError as exc:  # still in use by a node shutting down: log, never fail the end
                if exc.code not in ("InvalidPlacementGroup.Unknown", "InvalidPlacementGroup.NotFound"):
                    log.warning("cannot delete placement group %s in %s: %s", name, region, exc)

    def check(self) -> dict[str, Any]:
        region = self.region or self.api.default_region()
        result: dict[str, Any] = {
            "provider": self.name,
            "usable": False,
            "region": region or "",
            "detail": "",
            "missing": [],
        }
        try:
            identity = self.api.call(self.api.client("sts", region or "us-east-1").get_caller_identity)
        except ProviderError as exc:
            result["detail"] = str(exc)
            result["missing"] = [str(exc)]
            return result
        result.update(usable=True, account=identity.get("Account", ""), identity=identity.get("Arn", ""))
        result["detail"] = f"credentials of {identity.get('Arn', '?')}"
        add_missing(result, egress_missing(self))
        if not region:
            result["detail"] += "; no default region (offers carry their own region)"
            return result
        quotas: dict[str, float] = {}
        quota_client = self.api.client("service-quotas", region)
        for code, label in SPOT_QUOTAS.items():
            try:
                quota = quota_client.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]
                quotas[label] = float(quota["Value"])
            except Exception as exc:  # noqa: BLE001 -- a hint only: skip what cannot be read
                log.debug("quota %s not readable: %s", code, exc)
        result["quotas"] = quotas
        if not quotas:
            result["detail"] += "; spot quotas not readable (service-quotas), skipped"
        return result


def _ec2_token(client_token: str) -> str:
    """EC2 takes client tokens of at most 64 ASCII characters."""
    if len(client_token) <= 64 and client_token.isascii():
        return client_token
    return hashlib.sha256(client_token.encode()).hexdigest()
