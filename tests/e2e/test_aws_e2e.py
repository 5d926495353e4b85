"""Whole jobs on moto's EC2 and S3: launch → spot interruption notice → checkpoint in S3 → the
instance reclaimed with `Server.SpotInstanceTermination` → relaunch in another zone → resume →
finish, with final weights equal bit for bit to an uninterrupted run; and failover on every
capacity error, and a clean stop on expired credentials.

Everything real except the cloud: the controller, AWSProvider through boto3 over HTTP to moto's
server, the Agent in its own process per instance (tests/fakes/aws_emulator.py) watching its own
fake IMDSv2 endpoint, and the store on moto's S3 through S3Store.
"""

from __future__ import annotations

import shutil
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from spotrun.catalog.model import Offer
from spotrun.clouds.aws.provider import AWSProvider
from spotrun.clouds.base import Instance
from spotrun.clouds.store import open_store
from spotrun.control.controller import EXIT_BAD_INPUT
from tests.fakes import vm_image
from tests.fakes.aws_emulator import SPOT_TERMINATION, AWSEmulator
from tests.fakes.cloud_e2e import (
    BOOT_FAILURES,
    ROOT,
    ControllerRun,
    Reference,
    assert_booted_on_the_image,
    assert_failed_booting,
    corrupt_agent_package,
    exit_record,
    make_controller,
    output_digest,
    store_steps,
    write_spec,
    write_tiny_workdir,
)
from tests.fakes.moto_server import MotoServer, aws, fast_session, moto_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.e2e

REGION = "us-east-1"
TINY_ARGS = ["100", "10", "0.03"]  # steps, checkpoint every, seconds per step (the digest ignores the pause)
TORCH_ARGS = ["--steps", "20", "--every-steps", "5", "--samples", "640", "--log-every", "5"]
TORCH_PACE = ["--step-sleep", "0.05"]  # time to interrupt it; the weights do not depend on it


def v100_offer(zone: str, price: float) -> Offer:
    return Offer("aws", zone[:-1], zone, "p3.2xlarge", "V100", 1, 16.0, 8, 61, price, 3.06, 0.05)


def make_bucket(name: str) -> str:
    fast_session(REGION).client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/spotrun"


def ec2(region: str = REGION) -> Any:
    return fast_session(region).client("ec2")


def live_ids(region: str = REGION) -> list[str]:
    pages = ec2(region).describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running", "shutting-down", "stopped"]}]
    )
    return [i["InstanceId"] for r in pages["Reservations"] for i in r["Instances"]]


def state_reason(instance_id: str) -> str:
    raw = ec2().describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return (raw.get("StateReason") or {}).get("Code", "")


def first_instance(emu: AWSEmulator) -> str:
    return emu.wait_for(lambda: next(iter(emu.emulator.started), None), timeout=30, what="the first instance")


def hold_terminations(provider: AWSProvider) -> threading.Event:
    """The controller's TerminateInstances calls wait (10 s at most) until the returned event is
    set: the test decides that EC2 reclaims the instance before the controller gets round to
    terminating it, which otherwise is a race (both are right; this one is the must-show)."""
    reclaimed = threading.Event()

    def wait_for_the_reclaim(**_: Any) -> None:
        reclaimed.wait(10)

    provider.api.client("ec2", REGION).meta.events.register("before-send.ec2.TerminateInstances", wait_for_the_reclaim)
    return reclaimed


def preempted_then_finished(
    tmp_path: Path, aws_: MotoServer, *, workdir: Path, run: str, reference: Reference, resumed: str
) -> None:
    """The must-show scenario, for any workload that prints/writes FINAL_WEIGHTS_SHA256."""
    store_url = make_bucket("spotrun-e2e")
    spec = write_spec(tmp_path / "job.yaml", name="e2e-aws", gpu="V100", providers=["aws"], workdir=workdir, run=run)
    provider = AWSProvider(region=REGION, session=fast_session(REGION), regions=[REGION])
    offers = [v100_offer("us-east-1a", 0.90), v100_offer("us-east-1b", 0.95)]
    controller = make_controller(tmp_path, providers={"aws": provider}, offers=offers, store_url=store_url)
    job = controller.submit(spec)
    store = open_store(store_url)

    with AWSEmulator(tmp_path / "instances", regions=[REGION], env=aws_.env()) as emu:
        reclaimed = hold_terminations(provider)
        runner = ControllerRun(controller, job).start()
        first = first_instance(emu)
        assert emu.zone_of[first] == "us-east-1a"  # the cheapest zone first
        emu.wait_for(lambda: store_steps(store, job), timeout=60, what="a first checkpoint in S3")
        emu.announce_interruption(first, seconds=120)  # IMDS spot/instance-action: two minutes
        record = emu.wait_for(lambda: exit_record(store, job, 1), timeout=60, what="attempt 1 to save and stop")
        in_s3 = store_steps(store, job)
        assert emu.spot_terminate(first)  # EC2 takes the instance back
        reclaimed.set()
        result = runner.join(120, emu.report)

        assert record["reason"] == "preempted"
        saved = record["checkpoint_step"]
        assert saved in in_s3  # the checkpoint made on the notice was in S3 before the instance went
        attempts = controller.state.attempts(job)
        assert [(a.provider, a.zone, a.end_reason) for a in attempts] == [
            ("aws", "us-east-1a", "preempted"),
            ("aws", "us-east-1b", "completed"),
        ], emu.report()
        assert resumed.format(step=saved) in emu.instance(attempts[1].instance_id).agent_log()
        for attempt in attempts:
            assert_booted_on_the_image(emu.emulator, attempt.instance_id)
        assert state_reason(first) == SPOT_TERMINATION
    assert (result.exit_code, result.preemptions) == (0, 1), result
    assert output_digest(store, job) == reference.digest()  # bit for bit, as if never interrupted
    assert live_ids() == []  # nothing left running (or billed) in moto
    assert provider.list_owned(job) == []


def test_aws_spot_interruption_then_finished_in_another_zone_bit_for_bit(
    tmp_path: Path,
    aws: MotoServer,  # noqa: F811
) -> None:
    workdir = write_tiny_workdir(tmp_path / "work")
    reference = Reference(workdir, [*TINY_ARGS[:2], "0"])
    preempted_then_finished(
        tmp_path,
        aws,
        workdir=workdir,
        run="python tiny_train.py " + " ".join(TINY_ARGS),
        reference=reference,
        resumed="RESUMED_FROM={step}",
    )


def test_aws_torch_training_resumes_bit_for_bit(tmp_path: Path, aws: MotoServer) -> None:  # noqa: F811
    """The real example (torch, DataLoader workers, AdamW, OneCycle) through the same interruption."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(ROOT / "examples" / "train.py", workdir / "train.py")
    reference = Reference(workdir, TORCH_ARGS, "train.py")
    preempted_then_finished(
        tmp_path,
        aws,
        workdir=workdir,
        run="python train.py " + " ".join(TORCH_ARGS + TORCH_PACE),
        reference=reference,
        resumed="resuming at step {step}/",
    )


def test_aws_reclaimed_without_time_to_save_resumes_from_the_last_checkpoint(
    tmp_path: Path,
    aws: MotoServer,  # noqa: F811
) -> None:
    """EC2 takes the instance at once (no exit record): the provider's poll reports the reclaim
    from `StateReason`, and the next attempt resumes from the last periodic checkpoint in S3."""
    store_url = make_bucket("spotrun-e2e-reclaim")
    workdir = write_tiny_workdir(tmp_path / "work")
    reference = Reference(workdir, [*TINY_ARGS[:2], "0"])
    spec = write_spec(tmp_path / "job.yaml", name="e2e-aws-reclaim", gpu="V100", providers=["aws"],
                      workdir=workdir, run="python tiny_train.py " + " ".join(TINY_ARGS))  # fmt: skip
    provider = AWSProvider(region=REGION, session=fast_session(REGION), regions=[REGION])
    offers = [v100_offer("us-east-1a", 0.90), v100_offer("us-east-1c", 0.99)]
    controller = make_controller(tmp_path, providers={"aws": provider}, offers=offers, store_url=store_url)
    job = controller.submit(spec)
    store = open_store(store_url)

    with AWSEmulator(tmp_path / "instances", regions=[REGION], env=aws.env()) as emu:
        runner = ControllerRun(controller, job).start()
        first = first_instance(emu)
        steps = emu.wait_for(lambda: store_steps(store, job), timeout=60, what="a first checkpoint in S3")
        emu.spot_terminate(first)  # no notice at all: the machine is simply gone
        result = runner.join(120, emu.report)
        assert exit_record(store, job, 1) is None  # the Agent never had its say: poll saw the StateReason
        assert state_reason(first) == SPOT_TERMINATION
        attempts = controller.state.attempts(job)
        assert [(a.zone, a.end_reason) for a in attempts] == [("us-east-1a", "preempted"), ("us-east-1c", "completed")]
        log = emu.instance(attempts[1].instance_id).agent_log()
        assert any(f"RESUMED_FROM={s}" in log for s in range(steps[-1], int(TINY_ARGS[0]), int(TINY_ARGS[1])))
    assert (result.exit_code, result.preemptions) == (0, 1), result
    assert output_digest(store, job) == reference.digest()
    assert live_ids() == []


# Where each launch is refused, cheapest candidate first; the quota codes in regions of their own,
# since an account limit holds for the whole region. The last candidate has capacity.
REFUSALS = [
    ("us-east-1a", "InsufficientInstanceCapacity"),
    ("us-east-1b", "InsufficientHostCapacity"),
    ("us-east-1c", "UnfulfillableCapacity"),
    ("us-east-1d", "InsufficientCapacity"),
    ("us-east-1e", "SpotMaxPriceTooLow"),
    ("us-east-2a", "MaxSpotInstanceCountExceeded"),
    ("us-west-1b", "VcpuLimitExceeded"),
    ("us-west-2a", None),
]


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Any:
        yield self.body


def refuse_zones(provider: AWSProvider, refusals: dict[str, str | None]) -> list[str]:
    """EC2 answers RunInstances in zone Z with error `refusals[Z]` (a real request, parsed by
    botocore as EC2's answer; a 5xx for the capacity codes, as EC2 sends them). Registered on the
    provider's session, so every region's client gets it. Returns the zones asked, in order."""
    from botocore.awsrequest import AWSResponse

    asked: list[str] = []

    def answer(request: Any, **_: Any) -> Any:
        body = request.body.decode() if isinstance(request.body, bytes) else request.body
        zone = dict(urllib.parse.parse_qsl(body)).get("Placement.AvailabilityZone", "")
        asked.append(zone)
        code = refusals.get(zone)
        if code is None:
            return None
        status = 500 if code.startswith("Insufficient") else 400
        xml = f"<Response><Errors><Error><Code>{code}</Code><Message>no</Message></Error></Errors></Response>"
        return AWSResponse(request.url, status, {}, _Raw(xml.encode()))

    provider.api.session.events.register("before-send.ec2.RunInstances", answer)
    return asked


def test_every_capacity_error_fails_over_to_the_next_candidate(tmp_path: Path, aws: MotoServer) -> None:  # noqa: F811
    store_url = make_bucket("spotrun-e2e-failover")
    workdir = write_tiny_workdir(tmp_path / "work")
    spec = write_spec(tmp_path / "job.yaml", name="e2e-aws-failover", gpu="V100", providers=["aws"],
                      workdir=workdir, run="python tiny_train.py 5 5 0")  # fmt: skip
    zones = [zone for zone, _ in REFUSALS]
    regions = sorted({zone[:-1] for zone in zones})
    provider = AWSProvider(region=REGION, session=fast_session(REGION), regions=regions)
    offers = [v100_offer(zone, 0.90 + 0.01 * i) for i, zone in enumerate(zones)]  # in this order of price
    asked = refuse_zones(provider, dict(REFUSALS))
    controller = make_controller(tmp_path, providers={"aws": provider}, offers=offers, store_url=store_url)
    job = controller.submit(spec)

    with AWSEmulator(tmp_path / "instances", regions=regions, env=aws.env()) as emu:
        result = ControllerRun(controller, job).start().join(60, emu.report)
    assert result.exit_code == 0, result
    assert asked == zones  # each refusal once, then the next candidate, until one had capacity
    attempts = controller.state.attempts(job)
    assert [a.end_reason for a in attempts] == ["launch_failed"] * (len(zones) - 1) + ["completed"]
    assert (attempts[-1].region, attempts[-1].zone) == ("us-west-2", "us-west-2a")
    for region in regions:
        assert live_ids(region) == []


def test_expired_credentials_stop_the_job_with_a_clear_message(tmp_path: Path, aws: MotoServer) -> None:  # noqa: F811
    store_url = make_bucket("spotrun-e2e-auth")
    workdir = write_tiny_workdir(tmp_path / "work")
    spec = write_spec(tmp_path / "job.yaml", name="e2e-aws-auth", gpu="V100", providers=["aws"],
                      workdir=workdir, run="python tiny_train.py 5 5 0")  # fmt: skip
    provider = AWSProvider(region=REGION, session=fast_session(REGION), regions=[REGION])
    from botocore.awsrequest import AWSResponse

    def expired(request: Any, **_: Any) -> Any:
        xml = "<Response><Errors><Error><Code>ExpiredToken</Code><Message>The security token included in the " \
              "request is expired</Message></Error></Errors></Response>"  # fmt: skip
        return AWSResponse(request.url, 400, {}, _Raw(xml.encode()))

    provider.api.client("ec2", REGION).meta.events.register("before-send.ec2", expired)
    controller = make_controller(tmp_path, providers={"aws": provider}, offers=[v100_offer("us-east-1a", 0.9)],
                                 store_url=store_url)  # fmt: skip
    job = controller.submit(spec)
    result = ControllerRun(controller, job).start().join(30)
    assert result.exit_code == EXIT_BAD_INPUT, result
    assert "expired" in result.reason and "aws sso login" in result.reason
    assert "Traceback" not in result.reason
    assert live_ids() == []


@pytest.mark.parametrize("failure", [*sorted(BOOT_FAILURES), "no-identity"])
def test_aws_boot_failures_end_the_job_with_the_boot_log(tmp_path: Path, aws: MotoServer, failure: str) -> None:  # noqa: F811
    """The VM's bootstrap fails (its package index is unreachable; the Agent package is corrupt; the
    instance has no usable identity, so it cannot even write its boot log to S3): each attempt is a
    boot failure, and after max_boot_failures the job ends FAILED with the boot log's last lines,
    read from S3 or else from EC2's console output; every instance is terminated."""
    if vm_image.unavailable():
        pytest.skip(f"needs the emulated VM image: {vm_image.unavailable()}")
    store_url = make_bucket(f"spotrun-e2e-boot-{failure}")
    workdir = write_tiny_workdir(tmp_path / "work")
    spec = write_spec(tmp_path / "job.yaml", name="e2e-aws-boot", gpu="V100", providers=["aws"], workdir=workdir,
                      run="python tiny_train.py 5 5 0", recovery="{max_restarts: 0, max_boot_failures: 2}")  # fmt: skip
    provider = AWSProvider(region=REGION, session=fast_session(REGION), regions=[REGION])
    offers = [v100_offer("us-east-1a", 0.90), v100_offer("us-east-1b", 0.95)]
    controller = make_controller(tmp_path, providers={"aws": provider}, offers=offers, store_url=store_url)
    job = controller.submit(spec)
    index = vm_image.UNREACHABLE_INDEX if failure == "index-unreachable" else None
    identity = failure != "no-identity"
    emu = AWSEmulator(tmp_path / "instances", regions=[REGION], env=aws.env(), index_url=index, identity=identity)
    with emu:
        if failure == "corrupt-package":
            emu.emulator.before_boot = corrupt_agent_package
        result = ControllerRun(controller, job).start().join(240, emu.report)
        first = Instance.from_dict(controller.state.attempts(job)[0].instance or {})
        if failure == "no-identity":
            assert_failed_booting(
                result, controller, job, "index-unreachable", limit=2, expect="has no instance profile"
            )
            assert not open_store(store_url).exists(f"jobs/{job}/attempts/1/boot.log")  # it could not write it
        else:
            assert_failed_booting(result, controller, job, failure, limit=2)
            assert open_store(store_url).exists(f"jobs/{job}/attempts/1/boot.log")
        assert "BOOT FAILED" in provider.console_output(first)  # EC2 keeps the console after termination
    assert live_ids() == []
    assert provider.list_owned(job) == []
    assert vm_image.leftover_vms() == []  # no VM container left behind
