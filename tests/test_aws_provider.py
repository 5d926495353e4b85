"""AWSProvider against moto's server: real boto3 requests over HTTP.

Errors moto cannot produce (capacity, quota, throttling, expired tokens) are injected into the
real request path: a botocore `before-send` hook answers the signed, fully built HTTP request with
the error response EC2 would send, and botocore parses it as usual.
"""

from __future__ import annotations

import base64
import functools
import json
import urllib.parse
from dataclasses import asdict
from typing import Any

import pytest

from spotrun.catalog.model import Offer
from spotrun.clock import FakeClock
from spotrun.clouds.aws.api import AWSApi, translate_error
from spotrun.clouds.aws.provider import AWSProvider
from spotrun.clouds.aws.resources import (
    SECURITY_GROUP_NAME,
    controller_policy,
    controller_profile_name,
    profile_name,
    store_policy,
)
from spotrun.clouds.base import (
    AuthError,
    BadRequest,
    Boot,
    InstanceStatus,
    NoCapacity,
    PriceTooLow,
    ProviderError,
    QuotaExceeded,
    Throttled,
    extract_boot,
)
from tests.fakes.aws_emulator import spot_terminate
from tests.fakes.moto_server import (  # noqa: F401  (aws, moto_server: fixtures)
    TEST_ACCESS_KEY,
    TEST_SECRET_KEY,
    MotoServer,
    aws,
    fast_session,
    moto_server,
)

REGION = "us-east-1"
BUCKET = "spotrun-provider-test"
STORE = f"s3://{BUCKET}/runs"


def offer(zone: str = "us-east-1a", region: str = REGION, itype: str = "p3.2xlarge") -> Offer:
    return Offer(
        provider="aws",
        region=region,
        zone=zone,
        instance_type=itype,
        gpu="V100",
        gpu_count=1,
        gpu_memory_gb=16,
        vcpus=8,
        memory_gb=61,
        spot_price=0.92,
        ondemand_price=3.06,
        interruption_rate=0.05,
    )


def boot(job: str = "job-1", attempt: int = 1, **kw: Any) -> Boot:
    return Boot(
        job_id=job, attempt=attempt, store_url=STORE, job_prefix=f"jobs/{job}", spotrun_spec="spotrun==0.1.0", **kw
    )


def hooks(provider: AWSProvider, service: str = "ec2", region: str = REGION) -> Any:
    """The event hooks of the provider's own client for `service` (the one its calls go through)."""
    return provider.api.client(service, region).meta.events


class Recorder:
    """Records a provider's requests of one operation as they leave botocore (signed, complete)."""

    def __init__(self, provider: AWSProvider, operation: str = "RunInstances", service: str = "ec2") -> None:
        self.sent: list[Any] = []
        hooks(provider, service).register(f"before-send.{service}.{operation}", self._capture)

    def _capture(self, request: Any, **_: Any) -> None:
        self.sent.append(request)

    def params(self, index: int = -1) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(_body(self.sent[index])))


def _body(request: Any) -> str:
    return request.body.decode() if isinstance(request.body, bytes) else request.body


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Any:
        yield self.body


class Injection:
    """Answers a provider's `operation` requests with AWS error `code` (the first `times`, or all).

    The request is built and signed by botocore as usual; the hook answers it instead of the
    network, and botocore parses the answer like any EC2 (or STS/IAM) error response.
    """

    def __init__(
        self,
        provider: AWSProvider,
        operation: str,
        code: str,
        *,
        status: int = 400,
        times: int | None = None,
        service: str = "ec2",
        message: str = "",
    ) -> None:
        self.requests: list[Any] = []
        message = message or f"injected {code}"
        self.times = times
        self.status = status
        if service == "ec2":
            self.body = (
                f"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>{code}</Code>"
                f"<Message>{message}</Message></Error></Errors><RequestID>r-1</RequestID></Response>"
            )
        else:  # the query-protocol services (sts, iam)
            self.body = (
                f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message>"
                "</Error><RequestId>r-1</RequestId></ErrorResponse>"
            )
        self._events = hooks(provider, service)
        self._event = f"before-send.{service}.{operation}"
        self._events.register(self._event, self._answer)

    def _answer(self, request: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        self.requests.append(request)
        if self.times is None or len(self.requests) <= self.times:
            return AWSResponse(request.url, self.status, {"Content-Type": "text/xml"}, _Raw(self.body.encode()))
        return None

    def remove(self) -> None:
        self._events.unregister(self._event, self._answer)


def inject(provider: AWSProvider, operation: str, code: str, **kw: Any) -> list[Any]:
    """Inject `code` (see Injection); returns the list of requests it answered."""
    return Injection(provider, operation, code, **kw).requests


class SleepRecorder(FakeClock):
    def __init__(self) -> None:
        super().__init__()
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        super().sleep(seconds)


@pytest.fixture
def session(aws: MotoServer) -> Any:  # noqa: F811
    s3().create_bucket(Bucket=BUCKET)
    return fast_session(REGION)


@pytest.fixture
def clock() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
def provider(session: Any, clock: SleepRecorder) -> AWSProvider:
    return AWSProvider(region=REGION, session=session, clock=clock, regions=[REGION])


@functools.cache
def ec2() -> Any:
    return fast_session(REGION).client("ec2")


@functools.cache
def s3() -> Any:
    return fast_session(REGION).client("s3")


def described(instance_id: str) -> dict[str, Any]:
    return ec2().describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def live_instances() -> list[str]:
    pages = ec2().describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return [i["InstanceId"] for r in pages["Reservations"] for i in r["Instances"]]


# --------------------------------------------------------------------------- launch request


def test_spot_launch_request_shape(provider: AWSProvider, session: Any) -> None:
    rec = Recorder(provider)
    inst = provider.launch(offer("us-east-1b"), spot=True, boot=boot(), client_token="job-1-a1-tok")
    p = rec.params()
    assert p["InstanceMarketOptions.MarketType"] == "spot"
    assert p["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "one-time"
    assert p["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "terminate"
    assert not any("MaxPrice" in k for k in p)  # pay the spot price: no bid unless configured
    assert p["ClientToken"] == "job-1-a1-tok"
    assert p["Placement.AvailabilityZone"] == "us-east-1b"
    assert p["InstanceType"] == "p3.2xlarge"
    assert p["MetadataOptions.HttpTokens"] == "required"  # IMDSv2 only
    assert p["BlockDeviceMapping.1.Ebs.VolumeSize"] == "100"
    assert p["IamInstanceProfile.Name"] == profile_name("job-1")

    raw = described(inst.instance_id)
    assert raw["InstanceLifecycle"] == "spot"
    assert raw["Placement"]["AvailabilityZone"] == "us-east-1b"
    tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
    assert tags["spotrun:job"] == "job-1" and tags["spotrun:attempt"] == "1"
    volumes = ec2().describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [inst.instance_id]}])
    assert volumes["Volumes"][0]["Size"] == 100
    vtags = {t["Key"]: t["Value"] for t in volumes["Volumes"][0]["Tags"]}
    assert vtags["spotrun:job"] == "job-1" and vtags["spotrun:attempt"] == "1"

    assert (inst.provider, inst.region, inst.zone, inst.spot) == ("aws", REGION, "us-east-1b", True)
    assert (inst.job_id, inst.attempt) == ("job-1", 1)
    assert inst.details["security_group_id"] == raw["SecurityGroups"][0]["GroupId"]


def test_user_data_is_the_bootstrap_with_the_boot_record(provider: AWSProvider) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(env={"HF_HOME": "/data"}), client_token="t-ud")
    attr = ec2().describe_instance_attribute(InstanceId=inst.instance_id, Attribute="userData")
    script = base64.b64decode(attr["UserData"]["Value"]).decode()
    assert script.startswith("#!/bin/bash")
    got = extract_boot(script)
    assert (got.job_id, got.attempt, got.store_url, got.job_prefix) == ("job-1", 1, STORE, "jobs/job-1")
    assert got.notice == {"kind": "aws", "endpoint": "http://169.254.169.254"}
    assert got.env == {"HF_HOME": "/data"}
    assert "python3 -c 'import base64, sys, zlib;" in script  # spotrun/clouds/vmboot.py, on the image's python3


def test_max_price_only_when_configured(session: Any, clock: FakeClock) -> None:
    p = AWSProvider(region=REGION, session=session, clock=clock, max_price=1.5)
    rec = Recorder(p)
    p.launch(offer(), spot=True, boot=boot(), client_token="t-max")
    assert rec.params()["InstanceMarketOptions.SpotOptions.MaxPrice"] == "1.500000"


def test_on_demand_has_no_market_options(provider: AWSProvider, session: Any) -> None:
    rec = Recorder(provider)
    inst = provider.launch(offer(), spot=False, boot=boot(), client_token="t-od")
    assert not any(k.startswith("InstanceMarketOptions") for k in rec.params())
    assert "InstanceLifecycle" not in described(inst.instance_id)
    assert inst.spot is False


def test_offer_without_zone_lets_aws_choose(provider: AWSProvider, session: Any) -> None:
    rec = Recorder(provider)
    inst = provider.launch(offer(zone=""), spot=True, boot=boot(), client_token="t-nozone")
    assert not any(k.startswith("Placement") for k in rec.params())
    assert inst.zone.startswith(REGION)


def test_client_token_makes_launch_idempotent(provider: AWSProvider) -> None:
    first = provider.launch(offer(), spot=True, boot=boot(), client_token="same-token")
    again = provider.launch(offer(), spot=True, boot=boot(), client_token="same-token")
    assert again.instance_id == first.instance_id
    assert live_instances() == [first.instance_id]
    other = provider.launch(offer(), spot=True, boot=boot(attempt=2), client_token="other-token")
    assert sorted(live_instances()) == sorted([first.instance_id, other.instance_id])


def test_security_group_has_no_ingress_and_is_reused(provider: AWSProvider, session: Any) -> None:
    a = provider.launch(offer("us-east-1a"), spot=True, boot=boot(), client_token="sg-1")
    b = provider.launch(offer("us-east-1c"), spot=True, boot=boot(attempt=2), client_token="sg-2")
    group_id = a.details["security_group_id"]
    assert b.details["security_group_id"] == group_id
    group = ec2().describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    assert group["GroupName"] == SECURITY_GROUP_NAME
    assert group["IpPermissions"] == []
    assert {"Key": "spotrun:managed", "Value": "true"} in group["Tags"]
    for inst in (a, b):
        assert [g["GroupId"] for g in described(inst.instance_id)["SecurityGroups"]] == [group_id]

    # someone opens SSH on it: the next provider to use it closes it again, and creates no new group
    ec2().authorize_security_group_ingress(
        GroupId=group_id, IpProtocol="tcp", FromPort=22, ToPort=22, CidrIp="0.0.0.0/0"
    )
    fresh = AWSProvider(region=REGION, session=session, clock=FakeClock())
    c = fresh.launch(offer(), spot=True, boot=boot(attempt=3), client_token="sg-3")
    assert c.details["security_group_id"] == group_id
    assert ec2().describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]["IpPermissions"] == []
    named = ec2().describe_security_groups(Filters=[{"Name": "group-name", "Values": [SECURITY_GROUP_NAME]}])
    assert len(named["SecurityGroups"]) == 1


def test_no_secret_in_user_data_or_request(provider: AWSProvider, session: Any) -> None:
    rec = Recorder(provider)
    inst = provider.launch(offer(), spot=True, boot=boot(env={"WANDB_MODE": "offline"}), client_token="t-secret")
    request = rec.sent[-1]
    body = request.body.decode() if isinstance(request.body, bytes) else request.body
    headers = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
    attr = ec2().describe_instance_attribute(InstanceId=inst.instance_id, Attribute="userData")
    script = base64.b64decode(attr["UserData"]["Value"]).decode()
    decoded_boot = json.dumps(asdict(extract_boot(script)))
    request_user_data = base64.b64decode(dict(urllib.parse.parse_qsl(body))["UserData"]).decode()
    assert request_user_data == script
    for text in (body, script, decoded_boot):
        assert TEST_ACCESS_KEY not in text
        assert TEST_SECRET_KEY not in text
        assert "AWS_SECRET" not in text.upper()
        assert "AWS_SESSION_TOKEN" not in text.upper()
    assert TEST_SECRET_KEY not in headers  # the signature is derived from it; the key never travels


def test_launch_refuses_credentials_in_the_boot_env(provider: AWSProvider) -> None:
    leaky = boot(env={"AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY})
    with pytest.raises(BadRequest, match="credentials") as err:
        provider.launch(offer(), spot=True, boot=leaky, client_token="t-leak")
    assert TEST_SECRET_KEY not in str(err.value)
    with pytest.raises(BadRequest):
        provider.launch(offer(), spot=True, boot=boot(env={"KEY_ID": TEST_ACCESS_KEY}), client_token="t-leak2")
    assert live_instances() == []


def test_instance_profile_reaches_only_the_job_prefix(provider: AWSProvider, session: Any) -> None:
    provider.launch(offer(), spot=True, boot=boot(), client_token="t-iam")
    iam = session.client("iam")
    name = profile_name("job-1")
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [name]
    trust = profile["Roles"][0]["AssumeRolePolicyDocument"]
    trust = json.loads(urllib.parse.unquote(trust)) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    policy = iam.get_role_policy(RoleName=name, PolicyName="spotrun-store")["PolicyDocument"]
    policy = json.loads(policy) if isinstance(policy, str) else policy
    assert policy["Statement"][:3] == store_policy(STORE, "jobs/job-1")["Statement"]
    objects, data, listing, secret = policy["Statement"]
    assert secret["Action"] == "secretsmanager:GetSecretValue"  # the job's own secret, no other
    assert secret["Resource"] == "arn:aws:secretsmanager:*:*:secret:spotrun/job-1-??????"
    assert objects["Resource"] == f"arn:aws:s3:::{BUCKET}/runs/jobs/job-1/*"
    assert (data["Action"], data["Resource"]) == (
        "s3:GetObject",
        [f"arn:aws:s3:::{BUCKET}/runs/data/*", f"arn:aws:s3:::{BUCKET}/runs/agent/*"],
    )
    assert listing["Condition"]["StringLike"]["s3:prefix"] == ["runs/jobs/job-1", "runs/jobs/job-1/*"]
    # a second attempt of the same job reuses it; release_job removes it
    provider.launch(offer(), spot=True, boot=boot(attempt=2), client_token="t-iam-2")
    assert len(iam.list_instance_profiles()["InstanceProfiles"]) == 1
    provider.release_job("job-1")
    assert iam.list_instance_profiles()["InstanceProfiles"] == []
    assert [r for r in iam.list_roles()["Roles"] if r["RoleName"] == name] == []


def test_the_controller_host_gets_the_store_wide_controller_role(provider: AWSProvider, session: Any) -> None:
    """A controller host (boot role "controller") must launch and end its jobs' instances and make
    their per-job roles: its role is the store's controller role (what the CLI's identity may do,
    over the whole store), not a job's prefix-only role; one per store, reused by the next host."""
    host = boot("spotrun-controller", role="controller")
    inst = provider.launch(offer(), spot=False, boot=host, client_token="t-host")
    name = controller_profile_name(STORE)
    assert name.startswith("spotrun-controller-") and inst.details["instance_profile"] == name
    iam = session.client("iam")
    policy = iam.get_role_policy(RoleName=name, PolicyName="spotrun-store")["PolicyDocument"]
    policy = json.loads(policy) if isinstance(policy, str) else policy
    assert policy == controller_policy(STORE)
    by_sid = {st["Sid"]: st for st in policy["Statement"]}
    assert "ec2:RunInstances" in by_sid["Ec2"]["Action"] and "iam:PassRole" in by_sid["JobRoles"]["Action"]
    assert by_sid["Store"]["Resource"] == f"arn:aws:s3:::{BUCKET}/runs/*"  # every job, the queue, the lease
    assert by_sid["StoreList"]["Condition"]["StringLike"]["s3:prefix"] == ["runs", "runs/*"]
    assert "secretsmanager:GetSecretValue" not in json.dumps(policy)  # it never reads a job's secret
    provider.launch(offer(), spot=False, boot=host, client_token="t-host-2")  # the next host reuses it
    assert [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]] == [name]
    other = controller_profile_name("s3://another-bucket/x")
    assert other != name
    provider.release_controller(STORE)
    assert iam.list_instance_profiles()["InstanceProfiles"] == []
    provider.release_controller(STORE)  # idempotent


def test_a_just_created_profile_is_waited_for(provider: AWSProvider, clock: SleepRecorder) -> None:
    """IAM is eventually consistent: EC2 may not know a new instance profile for a few seconds."""
    message = (
        "Value (spotrun-job-1) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name"
    )
    refused = Injection(provider, "RunInstances", "InvalidParameterValue", times=2, message=message)
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t-iam-wait")
    assert len(refused.requests) == 3 and clock.slept == [2.0, 4.0]
    assert live_instances() == [inst.instance_id]


def test_named_instance_profile_is_used_as_is(session: Any, clock: FakeClock) -> None:
    iam = session.client("iam")
    iam.create_role(RoleName="mine", AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName="mine")
    iam.add_role_to_instance_profile(InstanceProfileName="mine", RoleName="mine")
    p = AWSProvider(region=REGION, session=session, clock=clock, instance_profile="mine")
    rec = Recorder(p)
    p.launch(offer(), spot=True, boot=boot(), client_token="t-named")
    assert rec.params()["IamInstanceProfile.Name"] == "mine"
    assert [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]] == ["mine"]


# --------------------------------------------------------------------------- image


def test_image_from_the_deep_learning_ami_search(provider: AWSProvider) -> None:
    """moto publishes no DLAMI SSM parameter: the Amazon-owned image search finds one."""
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t-img")
    image = ec2().describe_images(ImageIds=[described(inst.instance_id)["ImageId"]])["Images"][0]
    assert image["Name"].startswith("Deep Learning")


def test_image_from_an_ssm_parameter(session: Any, clock: FakeClock) -> None:
    wanted = ec2().describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    session.client("ssm").put_parameter(Name="/test/dlami", Value=wanted, Type="String")
    p = AWSProvider(region=REGION, session=session, clock=clock, ami_parameter="/test/dlami")
    inst = p.launch(offer(), spot=True, boot=boot(), client_token="t-ssm")
    assert described(inst.instance_id)["ImageId"] == wanted


def test_configured_ami_and_root_disk(session: Any, clock: FakeClock) -> None:
    image = [i for i in ec2().describe_images(Owners=["amazon"])["Images"] if i.get("RootDeviceName")][0]
    p = AWSProvider(region=REGION, session=session, clock=clock, ami=image["ImageId"], disk_gb=250)
    rec = Recorder(p)
    p.launch(offer(), spot=True, boot=boot(), client_token="t-ami")
    params = rec.params()
    assert params["ImageId"] == image["ImageId"]
    assert params["BlockDeviceMapping.1.DeviceName"] == image["RootDeviceName"]
    assert params["BlockDeviceMapping.1.Ebs.VolumeSize"] == "250"


def test_unknown_ami_is_a_bad_request(session: Any, clock: FakeClock) -> None:
    p = AWSProvider(region=REGION, session=session, clock=clock, ami="ami-00000000deadbeef0")
    with pytest.raises(BadRequest, match="ami-00000000deadbeef0"):
        p.launch(offer(), spot=True, boot=boot(), client_token="t-noami")


# --------------------------------------------------------------------------- errors


ERROR_CASES: list[tuple[str, type[ProviderError]]] = [
    ("InsufficientInstanceCapacity", NoCapacity),
    ("InsufficientHostCapacity", NoCapacity),
    ("UnfulfillableCapacity", NoCapacity),
    ("InsufficientCapacity", NoCapacity),
    ("MaxSpotInstanceCountExceeded", QuotaExceeded),
    ("VcpuLimitExceeded", QuotaExceeded),
    ("InstanceLimitExceeded", QuotaExceeded),
    ("SpotMaxPriceTooLow", PriceTooLow),
    ("AuthFailure", AuthError),
    ("UnauthorizedOperation", AuthError),
    ("ExpiredToken", AuthError),
    ("RequestExpired", AuthError),
    ("InvalidClientTokenId", AuthError),
    ("InvalidParameterValue", BadRequest),
    ("InvalidAMIID.Malformed", BadRequest),
    ("InvalidParameterCombination", BadRequest),
]


def test_every_error_code_becomes_its_shared_error(provider: AWSProvider, clock: SleepRecorder) -> None:
    """Each code, injected as EC2's answer to a real RunInstances request, in one provider (whose
    image, network and profile lookups are then cached: the loop costs a few ms per code)."""
    for code, kind in ERROR_CASES:
        injection = Injection(provider, "RunInstances", code)
        with pytest.raises(kind) as err:
            provider.launch(offer(), spot=True, boot=boot(), client_token=f"t-{code}")
        injection.remove()
        sent = injection.requests
        assert err.value.code == code, code
        assert len(sent) == 1 and "Action=RunInstances" in _body(sent[0]), code  # one real, signed request
        assert "Authorization" in sent[0].headers
        if kind is QuotaExceeded:
            assert err.value.scope == "region", code  # type: ignore[attr-defined]
        assert TEST_ACCESS_KEY not in str(err.value) and TEST_SECRET_KEY not in str(err.value)
    assert clock.slept == []  # none of them is retried
    assert live_instances() == []  # a failed launch leaves nothing running
    assert provider.list_owned("job-1") == []
    # and the provider still works once EC2 does
    assert provider.launch(offer(), spot=True, boot=boot(), client_token="t-after").instance_id in live_instances()


@pytest.mark.parametrize("code", ["RequestLimitExceeded", "Throttling"])
def test_throttling_is_retried_with_backoff(
    provider: AWSProvider, session: Any, clock: SleepRecorder, code: str
) -> None:
    sent = inject(provider, "RunInstances", code, status=503, times=2)
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t-throttle")
    assert len(sent) == 3  # two throttled, the third went through to moto
    assert len(clock.slept) == 2
    assert 0 <= clock.slept[0] <= 0.5 and 0 <= clock.slept[1] <= 1.0  # full jitter under base * 2^n
    assert live_instances() == [inst.instance_id]


def test_throttling_gives_up_after_bounded_attempts(session: Any, clock: SleepRecorder) -> None:
    p = AWSProvider(region=REGION, session=session, clock=clock, max_attempts=5, backoff_base=1.0, backoff_cap=3.0)
    sent = inject(p, "RunInstances", "RequestLimitExceeded", status=503)
    with pytest.raises(Throttled) as err:
        p.launch(offer(), spot=True, boot=boot(), client_token="t-throttle-forever")
    assert err.value.retryable
    assert len(sent) == 5 and len(clock.slept) == 4
    caps = [1.0, 2.0, 3.0, 3.0]  # base * 2^n, capped
    assert all(0 <= s <= c for s, c in zip(clock.slept, caps, strict=True))
    assert live_instances() == []


def test_expired_credentials_stop_with_a_clear_message(provider: AWSProvider, session: Any) -> None:
    inject(provider, "DescribeInstances", "ExpiredToken")
    with pytest.raises(AuthError) as err:
        provider.launch(offer(), spot=True, boot=boot(), client_token="t-expired")
    message = str(err.value)
    assert "expired" in message and "aws sso login" in message
    assert TEST_ACCESS_KEY not in message and TEST_SECRET_KEY not in message
    assert live_instances() == []


def test_missing_credentials_are_an_auth_error(aws: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # do not wait for an instance's IMDS
    p = AWSProvider(region=REGION, session=fast_session(REGION), clock=FakeClock())
    with pytest.raises(AuthError, match="no usable AWS credentials"):
        p.launch(offer(), spot=True, boot=boot(), client_token="t-nocreds")
    report = p.check()
    assert report["usable"] is False and "no usable AWS credentials" in report["detail"]


def test_translate_error_scrubs_key_ids() -> None:
    from botocore.exceptions import ClientError

    exc = ClientError(
        {"Error": {"Code": "InvalidParameterValue", "Message": "bad thing for AKIAABCDEFGHIJKLMNOP and s3cr3t"}},
        "RunInstances",
    )
    error = translate_error(exc, secrets=("s3cr3t",))
    assert isinstance(error, BadRequest)
    assert "AKIAABCDEFGHIJKLMNOP" not in str(error) and "s3cr3t" not in str(error)


def test_api_retries_only_throttling(clock: SleepRecorder) -> None:
    from botocore.exceptions import ClientError

    api = AWSApi(object(), clock=clock, max_attempts=3)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "x"}}, "DescribeInstances")
        return "ok"

    assert api.call(flaky) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):  # not an AWS error: untouched
        api.call(lambda: (_ for _ in ()).throw(ValueError("mine")))


# --------------------------------------------------------------------------- poll, terminate, list


def _put_exit(record: dict[str, Any], attempt: int = 1) -> None:
    s3().put_object(Bucket=BUCKET, Key=f"runs/jobs/job-1/attempts/{attempt}/exit", Body=json.dumps(record))


def test_poll_running_then_preempted(provider: AWSProvider) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t-poll")
    assert provider.poll(inst).status in (InstanceStatus.PENDING, InstanceStatus.RUNNING)
    assert provider.poll(inst).status == InstanceStatus.RUNNING
    spot_terminate(REGION, inst.instance_id)
    state = provider.poll(inst)
    assert state.status == InstanceStatus.PREEMPTED and "SpotInstanceTermination" in state.reason
    assert not state.alive


def test_poll_user_terminated(provider: AWSProvider) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t-term")
    provider.terminate(inst)
    provider.terminate(inst)  # idempotent
    state = provider.poll(inst)
    assert state.status == InstanceStatus.TERMINATED and "UserInitiated" in state.reason


def test_poll_reads_the_agent_exit_record(provider: AWSProvider) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t-exit")
    _put_exit({"code": 3, "reason": "failed"})
    state = provider.poll(inst)
    assert (state.status, state.exit_code) == (InstanceStatus.EXITED, 3)


@pytest.mark.parametrize("body", ['{"code": "oops", "reason": "failed"}', "[1, 2]", "[" * 100000 + "]" * 100000])
def test_poll_ignores_a_malformed_exit_record(provider: AWSProvider, body: str) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t-exit-bad")
    s3().put_object(Bucket=BUCKET, Key="runs/jobs/job-1/attempts/1/exit", Body=body)
    assert provider.poll(inst).status in (InstanceStatus.PENDING, InstanceStatus.RUNNING)  # old: a crash


def test_poll_exit_record_preempted_or_completed_before_the_reclaim(provider: AWSProvider) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t-exit-pre")
    _put_exit({"code": 143, "reason": "preempted"})
    assert provider.poll(inst).status == InstanceStatus.PREEMPTED  # saved and stopped on the notice
    spot_terminate(REGION, inst.instance_id)
    assert provider.poll(inst).status == InstanceStatus.PREEMPTED

    done = provider.launch(offer(), spot=True, boot=boot(attempt=2), client_token="t-exit-done")
    _put_exit({"code": 0, "reason": "completed"}, attempt=2)
    spot_terminate(REGION, done.instance_id)  # reclaimed just after the job finished: still a success
    state = provider.poll(done)
    assert (state.status, state.exit_code) == (InstanceStatus.EXITED, 0)


def test_poll_unknown_instance(provider: AWSProvider, clock: FakeClock) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t-gone")
    inst.instance_id = "i-0000000000000dead"
    assert provider.poll(inst).status == InstanceStatus.PENDING  # just launched: EC2 may lag
    clock.advance(600)
    assert provider.poll(inst).status == InstanceStatus.TERMINATED


def test_poll_retries_a_throttled_describe(provider: AWSProvider, session: Any, clock: SleepRecorder) -> None:
    inst = provider.launch(offer(), spot=True, boot=boot(), client_token="t-poll-throttle")
    inject(provider, "DescribeInstances", "RequestLimitExceeded", status=503, times=1)
    assert provider.poll(inst).status == InstanceStatus.RUNNING
    assert len(clock.slept) == 1


def test_list_owned_finds_live_instances_of_the_job_only(provider: AWSProvider) -> None:
    a = provider.launch(offer("us-east-1a"), spot=True, boot=boot(), client_token="l-1")
    b = provider.launch(offer("us-east-1b"), spot=True, boot=boot(attempt=2), client_token="l-2")
    provider.launch(offer(), spot=True, boot=boot(job="job-2"), client_token="l-3")
    owned = provider.list_owned("job-1")
    assert sorted(i.instance_id for i in owned) == sorted([a.instance_id, b.instance_id])
    assert {(i.job_id, i.attempt, i.zone) for i in owned} == {("job-1", 1, "us-east-1a"), ("job-1", 2, "us-east-1b")}
    provider.terminate(a)
    spot_terminate(REGION, b.instance_id)
    assert provider.list_owned("job-1") == []


def test_list_owned_sweeps_every_region_launched_in(provider: AWSProvider) -> None:
    east = provider.launch(offer(), spot=True, boot=boot(), client_token="r-1")
    west = provider.launch(offer("us-west-2a", region="us-west-2"), spot=True, boot=boot(attempt=2), client_token="r-2")
    assert {i.instance_id: i.region for i in provider.list_owned("job-1")} == {
        east.instance_id: REGION,
        west.instance_id: "us-west-2",
    }


def test_list_owned_of_a_fresh_provider_sweeps_every_enabled_region(session: Any, clock: FakeClock) -> None:
    """A restarted controller's provider knows no launch yet: it asks EC2 for the account's
    regions (answered here with two of moto's, to keep the test fast) and looks in each."""
    west = AWSProvider(region="us-west-2", session=session, clock=clock, regions=["us-west-2"])
    stray = west.launch(offer("us-west-2b", region="us-west-2"), spot=True, boot=boot(), client_token="r-3")
    fresh = AWSProvider(region=REGION, session=fast_session(REGION), clock=clock)
    asked = Injection(fresh, "DescribeRegions", "unused")
    asked.status, asked.body = (
        200,
        (
            "<DescribeRegionsResponse><regionInfo>"
            "<item><regionName>us-east-1</regionName></item><item><regionName>us-west-2</regionName></item>"
            "</regionInfo></DescribeRegionsResponse>"
        ),
    )
    assert [i.instance_id for i in fresh.list_owned("job-1")] == [stray.instance_id]
    assert [i.instance_id for i in fresh.list_owned("job-1")] == [stray.instance_id]
    assert len(asked.requests) == 1  # once per provider


# --------------------------------------------------------------------------- check


def test_check_reports_identity_and_region_without_launching(provider: AWSProvider) -> None:
    report = provider.check()
    assert report["usable"] is True
    assert report["provider"] == "aws" and report["region"] == REGION
    assert report["account"] == "123456789012"
    assert isinstance(report["quotas"], dict)
    assert TEST_SECRET_KEY not in json.dumps(report)
    assert live_instances() == []


def test_check_with_expired_credentials(provider: AWSProvider, session: Any) -> None:
    inject(provider, "GetCallerIdentity", "ExpiredToken", service="sts", status=403)
    report = provider.check()
    assert report["usable"] is False and "expired" in report["detail"]
