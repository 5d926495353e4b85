"""EC2 instances on moto that really run: the real Agent per spotrun instance, with its own IMDS.

`AWSEmulator` watches moto (real boto3 over HTTP) for live instances tagged `spotrun:job`, reads
each one's user-data, and runs the Agent of its boot record (`tests/fakes/emulator.py`). Each
instance gets a `FakeIMDS` on a free loopback port, standing in for 169.254.169.254: the boot
record's notice endpoint is pointed at it, as the link-local address would reach the instance's
own metadata service. The Agent's environment carries moto's endpoint and test keys, standing in
for the instance profile.

A spot interruption, as EC2 does it:

    emu.announce_interruption(instance_id, seconds=120)  # IMDS instance-action appears
    ... the Agent checkpoints and uploads ...
    emu.spot_terminate(instance_id)  # moto: terminated, StateReason Server.SpotInstanceTermination

Where the emulated VM image is available (tests/fakes/vm_image.py), each instance is a container
running its user-data unmodified: the bootstrap reads the instance profile's credentials from the
instance's FakeIMDS (reached through `AWS_EC2_METADATA_SERVICE_ENDPOINT`, the SDKs' own IMDS
override, as the link-local address would reach it) and S3 at moto (`AWS_ENDPOINT_URL`, standing in
for the S3 DNS name); no key is in its environment. An instance whose OS powers off is terminated
(`InstanceInitiatedShutdownBehavior=terminate`, as the provider launches them).

moto has no API for a service-initiated termination, but its server runs in this process
(`ThreadedMotoServer`), so `spot_terminate` sets the instance's state in moto's EC2 backend
directly; every client, the provider's included, then sees it through the normal API.
"""

from __future__ import annotations

import base64
import copy
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from spotrun.clouds.base import Boot, extract_boot
from tests.fakes.emulator import EmulatedInstance, InstanceEmulator, VMHooks
from tests.fakes.imds import FakeIMDS
from tests.fakes.moto_server import TEST_ACCESS_KEY, TEST_SECRET_KEY, ec2_backend

SPOT_TERMINATION = "Server.SpotInstanceTermination"


def spot_terminate(region: str, instance_id: str) -> bool:
    """Terminate `instance_id` in moto the way EC2 reclaims a spot instance. False if it was
    already terminated (there is nothing left to reclaim)."""
    from moto.ec2.models.instances import StateReason

    instance = ec2_backend(region).get_instance(instance_id)
    if instance._state.name == "terminated":
        return False
    instance.terminate()
    instance.state_reason = StateReason(f"{SPOT_TERMINATION}: Spot instance termination", SPOT_TERMINATION)
    instance._reason = "Service initiated"  # what EC2 puts in StateTransitionReason
    # EC2 ignores TerminateInstances on a terminated instance; moto would rewrite its StateReason
    instance.terminate = lambda: copy.copy(instance._state)
    return True


# instance id -> its serial console, for moto's GetConsoleOutput (which otherwise answers a canned
# 2006 kernel log for every instance); installed by `serve_consoles`
CONSOLES: dict[str, Any] = {}


def serve_consoles() -> None:
    """moto's EC2 GetConsoleOutput answers with an emulated VM's console where there is one (moto's
    server runs in this process; EC2 returns the console's latest output, base64-encoded)."""
    from moto.core.responses import ActionResult
    from moto.core.utils import utcnow
    from moto.ec2.responses.general import General
    from moto.ec2.utils import Base64EncodedString

    if getattr(General, "_spotrun_consoles", False):
        return
    canned = General.get_console_output

    def get_console_output(self: Any) -> Any:
        instance_id = self._get_param("InstanceId")
        source = CONSOLES.get(instance_id)
        if source is None:
            return canned(self)
        instance = self.ec2_backend.get_instance(instance_id)  # InvalidInstanceID.NotFound as EC2
        output = Base64EncodedString.from_raw_string(source()[-64 * 1024 :])  # EC2 keeps the last 64 KB
        return ActionResult({"InstanceId": instance.id, "Timestamp": utcnow(), "Output": output})

    General.get_console_output = get_console_output
    General._spotrun_consoles = True


class AWSEmulator:
    def __init__(
        self,
        root: Path,
        *,
        regions: list[str],
        env: dict[str, str],
        notice_poll_interval: float = 0.2,
        interval: float = 0.05,
        index_url: str | None = None,
        identity: bool = True,
    ) -> None:
        self.regions = list(regions)
        self.identity = identity  # False: IMDS serves no role credentials (a broken instance profile)
        self.endpoint = env.get("AWS_ENDPOINT_URL", "")
        self.role_of: dict[str, str | None] = {}
        self.notice_poll_interval = notice_poll_interval
        self.region_of: dict[str, str] = {}
        self.zone_of: dict[str, str] = {}
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.emulator = InstanceEmulator(
            list_instances=self._list,
            boot_of=self._boot_of,
            root=root,
            env=env,
            prepare=self._prepare,
            release=self._release,
            interval=interval,
            vm=VMHooks(
                self._user_data,
                self._vm_env,
                index_url=index_url,
                powered_off=self._powered_off,
                console=CONSOLES.__setitem__,
            ),
        )

    # ------------------------------------------------------------------ cloud side

    def _ec2(self, region: str) -> Any:
        with self._lock:
            if region not in self._clients:
                import boto3

                self._clients[region] = boto3.client("ec2", region_name=region)
            return self._clients[region]

    def _list(self) -> list[str]:
        ids: list[str] = []
        for region in self.regions:
            pages = self._ec2(region).describe_instances(
                Filters=[
                    {"Name": "tag-key", "Values": ["spotrun:job"]},
                    {"Name": "instance-state-name", "Values": ["pending", "running"]},
                ]
            )
            for reservation in pages["Reservations"]:
                for raw in reservation["Instances"]:
                    self.region_of[raw["InstanceId"]] = region
                    self.zone_of[raw["InstanceId"]] = raw["Placement"]["AvailabilityZone"]
                    arn = (raw.get("IamInstanceProfile") or {}).get("Arn", "")
                    self.role_of[raw["InstanceId"]] = arn.rsplit("/", 1)[-1] or None
                    ids.append(raw["InstanceId"])
        return ids

    def _user_data(self, instance_id: str) -> str:
        attribute = self._ec2(self.region_of[instance_id]).describe_instance_attribute(
            InstanceId=instance_id, Attribute="userData"
        )
        return base64.b64decode(attribute["UserData"]["Value"]).decode()

    def _boot_of(self, instance_id: str) -> Boot:
        return extract_boot(self._user_data(instance_id))

    def _vm_env(self, instance_id: str, imds: FakeIMDS) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region_of[instance_id],
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url + "/",
        }

    def _powered_off(self, instance_id: str) -> None:
        self._ec2(self.region_of[instance_id]).terminate_instances(InstanceIds=[instance_id])

    def _prepare(self, instance_id: str, boot: Boot) -> tuple[Boot, FakeIMDS]:
        imds = FakeIMDS(
            instance_id=instance_id,
            zone=self.zone_of.get(instance_id, ""),
            role=self.role_of.get(instance_id) if self.identity else None,
            credentials=(TEST_ACCESS_KEY, TEST_SECRET_KEY),
        )
        notice = {**boot.notice, "endpoint": imds.url, "poll_interval": self.notice_poll_interval}
        return replace(boot, notice=notice), imds

    @staticmethod
    def _release(instance_id: str, imds: FakeIMDS | None) -> None:
        if imds is not None:
            imds.close()

    # ------------------------------------------------------------------ test side

    def start(self) -> AWSEmulator:
        serve_consoles()
        self.emulator.start()
        return self

    def stop(self) -> None:
        self.emulator.stop()

    def __enter__(self) -> AWSEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def instance(self, instance_id: str) -> EmulatedInstance:
        return self.emulator.instance(instance_id)

    def imds(self, instance_id: str) -> FakeIMDS:
        return self.instance(instance_id).handle

    def announce_interruption(self, instance_id: str, seconds: float = 120.0) -> float:
        return self.imds(instance_id).announce_interruption(seconds=seconds)

    def spot_terminate(self, instance_id: str) -> bool:
        return spot_terminate(self.region_of[instance_id], instance_id)

    def wait_for(self, predicate: Any, *, timeout: float, what: str) -> Any:
        return self.emulator.wait_for(predicate, timeout=timeout, what=what)

    def report(self) -> str:
        return self.emulator.report()
