"""What an EC2 launch needs before RunInstances: image, network, firewall, instance profile.

Each is found or created once and cached per region (or VPC, or job), and each step is
idempotent, so two launches racing, or a launch retried after a crash, end up sharing the same
resources instead of duplicating them.

* image: the configured AMI, else the Deep Learning AMI's SSM public parameter, else the newest
  Amazon-owned image whose name matches a Deep Learning AMI pattern (x86_64).
* network: the configured subnet (in the provider's home region), or another subnet of its VPC in
  the offer's zone; else the default VPC's default subnet of the zone (none: EC2 picks).
* security group `spotrun-no-ingress` per VPC: created once, tagged `spotrun:managed`, with no
  inbound rule at all (a rule someone added is revoked); outbound stays open for S3 and pip.
* instance profile: the configured one, else one role + profile per job, `spotrun-<job>`, whose
  only permissions are the job's prefix of the S3 store (`store_policy`). Deleted by `release_job`.
  The controller host (`Boot.role == "controller"`) gets one role per store,
  `spotrun-controller-<hash>`, with what the CLI's own identity needs (`controller_policy`, the
  policy docs/providers/aws.md tells the user to grant): it launches, watches and ends the jobs'
  instances and makes their per-job roles. It stays for the store's next host (no cost);
  `release_controller` deletes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from typing import Any

from spotrun.clouds.aws.api import AWSApi
from spotrun.clouds.base import AuthError, BadRequest, Boot

log = logging.getLogger(__name__)

DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
DLAMI_NAME_PATTERNS = (
    "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *",
    "Deep Learning*",
)
SECURITY_GROUP_NAME = "spotrun-no-ingress"
TAG_JOB = "spotrun:job"
TAG_MANAGED = "spotrun:managed"
ROLE_POLICY_NAME = "spotrun-store"


def store_policy(store_url: str, job_prefix: str) -> dict[str, Any]:
    """The IAM policy of a job's instance profile: its own prefix of the S3 store, and read-only
    the store's content-addressed `data/` (datasets uploaded once, shared by jobs) and `agent/`
    (the spotrun package the VM installs); nothing else."""
    from urllib.parse import urlparse

    parsed = urlparse(store_url)
    root = parsed.path.strip("/")
    prefix = f"{root}/{job_prefix.strip('/')}" if root else job_prefix.strip("/")
    data = f"{root}/data" if root else "data"
    agent = f"{root}/agent" if root else "agent"
    bucket = parsed.netloc
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "JobObjects",
                "Effect": "Allow",
                "Action": [
                    "s3:GetObject",
                    "s3:PutObject",
                    "s3:DeleteObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts",
                ],
                "Resource": f"arn:aws:s3:::{bucket}/{prefix}/*",
            },
            {
                "Sid": "SharedData",
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": [f"arn:aws:s3:::{bucket}/{data}/*", f"arn:aws:s3:::{bucket}/{agent}/*"],
            },
            {
                "Sid": "ListJobPrefix",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": f"arn:aws:s3:::{bucket}",
                "Condition": {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}},
            },
        ],
    }


def _with_secret_read(policy: dict[str, Any], job_id: str) -> dict[str, Any]:
    """The role may also read the job's own secret in Secrets Manager (`secrets.py`), no other."""
    from spotrun.clouds.aws.secrets import secret_read_statement

    return {**policy, "Statement": [*policy["Statement"], secret_read_statement(job_id)]}


def controller_policy(store_url: str) -> dict[str, Any]:
    """The controller host's role: everything the identity that runs `spotrun` needs (the policy
    in docs/providers/aws.md, which a test compares with this one), with the store scoped to the
    host's own store (every job's prefix, the host's queue and lease, shared data)."""
    from urllib.parse import urlparse

    parsed = urlparse(store_url)
    bucket, root = parsed.netloc, parsed.path.strip("/")
    objects = f"arn:aws:s3:::{bucket}/{root}/*" if root else f"arn:aws:s3:::{bucket}/*"
    listing: dict[str, Any] = {"Sid": "StoreList", "Effect": "Allow", "Action": "s3:ListBucket"}
    listing["Resource"] = f"arn:aws:s3:::{bucket}"
    if root:
        listing["Condition"] = {"StringLike": {"s3:prefix": [root, f"{root}/*"]}}
    statement = [
        {"Sid": "Ec2", "Effect": "Allow", "Resource": "*", "Action": [f"ec2:{a}" for a in CONTROLLER_EC2]},
        {
            "Sid": "DeepLearningAmi",
            "Effect": "Allow",
            "Action": "ssm:GetParameter",
            "Resource": "arn:aws:ssm:*::parameter/aws/service/deeplearning/*",
        },
        {
            "Sid": "JobRoles",
            "Effect": "Allow",
            "Resource": ["arn:aws:iam::*:role/spotrun-*", "arn:aws:iam::*:instance-profile/spotrun-*"],
            "Action": [f"iam:{a}" for a in CONTROLLER_IAM],
        },
        {
            "Sid": "SpotServiceRole",
            "Effect": "Allow",
            "Action": "iam:CreateServiceLinkedRole",
            "Resource": "arn:aws:iam::*:role/aws-service-role/spot.amazonaws.com/*",
        },
        {
            "Sid": "Store",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
            "Resource": objects,
        },
        listing,
        {
            "Sid": "Check",
            "Effect": "Allow",
            "Resource": "*",
            "Action": ["sts:GetCallerIdentity", "servicequotas:GetServiceQuota"],
        },
        {
            "Sid": "JobSecrets",
            "Effect": "Allow",
            "Resource": "arn:aws:secretsmanager:*:*:secret:spotrun/*",
            "Action": [f"secretsmanager:{a}" for a in CONTROLLER_SECRETS],
        },
    ]
    return {"Version": "2012-10-17", "Statement": statement}


CONTROLLER_EC2 = (
    "RunInstances",
    "CreateTags",
    "TerminateInstances",
    "DescribeInstances",
    "DescribeImages",
    "DescribeVpcs",
    "DescribeSubnets",
    "DescribeSecurityGroups",
    "DescribeRouteTables",
    "CreateSecurityGroup",
    "RevokeSecurityGroupIngress",
    "DescribeSpotPriceHistory",
    "DescribeRegions",
    "GetConsoleOutput",
    "CreatePlacementGroup",
    "DeletePlacementGroup",
)
CONTROLLER_IAM = (
    "CreateRole",
    "TagRole",
    "PutRolePolicy",
    "DeleteRolePolicy",
    "DeleteRole",
    "CreateInstanceProfile",
    "TagInstanceProfile",
    "GetInstanceProfile",
    "AddRoleToInstanceProfile",
    "RemoveRoleFromInstanceProfile",
    "DeleteInstanceProfile",
    "PassRole",
)
CONTROLLER_SECRETS = (
    "CreateSecret",
    "PutSecretValue",
    "TagResource",
    "PutResourcePolicy",
    "DescribeSecret",
    "DeleteSecret",
)


def controller_profile_name(store_url: str) -> str:
    """The controller host's role and instance profile: one per store (a `spotrun-*` name, which
    the user's own policy lets spotrun create and pass)."""
    return f"spotrun-controller-{hashlib.sha256(store_url.encode()).hexdigest()[:16]}"


EC2_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def _tags(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or []}


def profile_name(job_id: str) -> str:
    """The job's role and instance profile name (IAM allows [A-Za-z0-9+=,.@_-], 64 characters)."""
    clean = re.sub(r"[^A-Za-z0-9+=,.@_-]", "-", job_id)
    name = f"spotrun-{clean}"
    return name if len(name) <= 64 else f"spotrun-{hashlib.sha256(job_id.encode()).hexdigest()[:40]}"


class LaunchResources:
    def __init__(
        self,
        api: AWSApi,
        *,
        ami: str | None = None,
        instance_profile: str | None = None,
        subnet_id: str | None = None,
        security_group_id: str | None = None,
        ami_parameter: str = DLAMI_PARAMETER,
        ami_name_patterns: tuple[str, ...] = DLAMI_NAME_PATTERNS,
        subnet_nat: bool = False,
    ) -> None:
        """`subnet_id` and `security_group_id` belong to the api's home region: used only there.
        `subnet_nat`: the configured subnet reaches the internet through a NAT (no public IP needed)."""
        self.subnet_nat = subnet_nat
        self.api = api
        self.region = api.region
        self.ami = ami
        self.instance_profile_name = instance_profile
        self.subnet_id = subnet_id
        self.security_group_id = security_group_id
        self.ami_parameter = ami_parameter
        self.ami_name_patterns = tuple(ami_name_patterns)
        self._images: dict[str, tuple[str, str]] = {}
        self._groups: dict[tuple[str, str], str] = {}
        self._profiles: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def image(
        self, region: str, *, parameter: str | None = None, patterns: tuple[str, ...] = (), arch: str = "x86_64"
    ) -> tuple[str, str]:
        """(image id, root device name) for `region`. `parameter`/`patterns`/`arch` come from the
        image table (clouds/aws/images.py) when the offer's GPU needs another DLAMI than the default."""
        parameter = parameter or self.ami_parameter
        key = f"{region}|{parameter}|{arch}"
        with self._lock:
            if key in self._images:
                return self._images[key]
        ec2 = self.api.client("ec2", region)
        image_id = self.ami or self._ami_from_parameter(region, parameter)
        if image_id:
            images = self.api.call(ec2.describe_images, ImageIds=[image_id])["Images"]
            if not images:
                raise BadRequest(f"AMI {image_id} not found in {region}", code="InvalidAMIID.NotFound")
        else:
            images = []
            for pattern in (*patterns, *self.ami_name_patterns):
                images = self.api.call(
                    ec2.describe_images,
                    Owners=["amazon"],
                    Filters=[
                        {"Name": "name", "Values": [pattern]},
                        {"Name": "state", "Values": ["available"]},
                        {"Name": "architecture", "Values": [arch]},
                    ],
                )["Images"]
                if images:
                    break
            if not images:
                raise BadRequest(
                    f"no Deep Learning AMI found in {region}: name one with `ami` in the AWS config",
                    code="NoImage",
                )
            images.sort(key=lambda i: (i.get("CreationDate", ""), i.get("Name", "")))
        image = images[-1]
        found = (image["ImageId"], image.get("RootDeviceName") or "/dev/sda1")
        with self._lock:
            self._images[key] = found
        return found

    def _ami_from_parameter(self, region: str, parameter: str) -> str | None:
        ssm = self.api.client("ssm", region)
        try:
            return str(self.api.call(ssm.get_parameter, Name=parameter)["Parameter"]["Value"])
        except (BadRequest, AuthError) as exc:  # not published here, or not allowed to read it
            log.info("SSM parameter %s not usable in %s (%s): searching images", parameter, region, exc.code)
            return None

    def _home_region(self) -> str | None:
        """The region the configured subnet and security group live in (ids are per region)."""
        return self.region or self.api.default_region()

    def network(self, region: str, zone: str) -> tuple[str, str | None]:
        """(VPC id, subnet id or None: let EC2 pick the default subnet of the zone)."""
        ec2 = self.api.client("ec2", region)
        if self.subnet_id and region == self._home_region():
            subnet = self.api.call(ec2.describe_subnets, SubnetIds=[self.subnet_id])["Subnets"][0]
            if not zone or subnet["AvailabilityZone"] == zone:
                return subnet["VpcId"], subnet["SubnetId"]
            others = self.api.call(
                ec2.describe_subnets,
                Filters=[
                    {"Name": "vpc-id", "Values": [subnet["VpcId"]]},
                    {"Name": "availability-zone", "Values": [zone]},
                ],
            )["Subnets"]
            if not others:
                raise BadRequest(f"VPC {subnet['VpcId']} has no subnet in {zone}", code="NoSubnetInZone")
            return subnet["VpcId"], sorted(s["SubnetId"] for s in others)[0]
        vpcs = self.api.call(ec2.describe_vpcs, Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise BadRequest(f"no default VPC in {region}: set `subnet_id` in the AWS config", code="NoDefaultVpc")
        vpc_id = vpcs[0]["VpcId"]
        if not zone:
            return vpc_id, None
        subnets = self.api.call(
            ec2.describe_subnets,
            Filters=[
                {"Name": "vpc-id", "Values": [vpc_id]},
                {"Name": "availability-zone", "Values": [zone]},
                {"Name": "default-for-az", "Values": ["true"]},
            ],
        )["Subnets"]
        return vpc_id, (subnets[0]["SubnetId"] if subnets else None)

    def security_group(self, region: str, vpc_id: str) -> str:
        """The VPC's no-ingress group: found by name or created, stripped of any inbound rule."""
        if self.security_group_id and region == self._home_region():
            return self.security_group_id
        with self._lock:
            if (region, vpc_id) in self._groups:
                return self._groups[(region, vpc_id)]
        ec2 = self.api.client("ec2", region)
        filters = [
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "group-name", "Values": [SECURITY_GROUP_NAME]},
        ]
        groups = self.api.call(ec2.describe_security_groups, Filters=filters)["SecurityGroups"]
        if groups:
            group = groups[0]
            if group.get("IpPermissions"):
                log.warning("removing inbound rules someone added to %s", group["GroupId"])
                self.api.call(
                    ec2.revoke_security_group_ingress, GroupId=group["GroupId"], IpPermissions=group["IpPermissions"]
                )
            group_id = group["GroupId"]
        else:
            try:
                group_id = self.api.call(
                    ec2.create_security_group,
                    GroupName=SECURITY_GROUP_NAME,
                    Description="spotrun instances: no inbound traffic at all",
                    VpcId=vpc_id,
                    TagSpecifications=[
                        {"ResourceType": "security-group", "Tags": [{"Key": TAG_MANAGED, "Value": "true"}]}
                    ],
                )["GroupId"]
            except BadRequest as exc:  # created meanwhile by another launch
                if exc.code != "InvalidGroup.Duplicate":
                    raise
                group_id = self.api.call(ec2.describe_security_groups, Filters=filters)["SecurityGroups"][0]["GroupId"]
        with self._lock:
            self._groups[(region, vpc_id)] = group_id
        return group_id

    def instance_profile(self, boot: Boot) -> tuple[dict[str, str] | None, bool]:
        """(IamInstanceProfile spec or None, whether it was just created)."""
        if self.instance_profile_name:
            key = "Arn" if self.instance_profile_name.startswith("arn:") else "Name"
            return {key: self.instance_profile_name}, False
        if not boot.store_url.startswith("s3://"):
            return None, False
        if boot.role == "controller":
            name = controller_profile_name(boot.store_url)
            policy = controller_policy(boot.store_url)
            what = f"spotrun controller host of {boot.store_url}: launches and ends its jobs' instances"
        else:
            name = profile_name(boot.job_id)
            policy = _with_secret_read(store_policy(boot.store_url, boot.job_prefix), boot.job_id)
            what = f"spotrun job {boot.job_id}: its own prefix of the store"
        with self._lock:
            if name in self._profiles:
                return self._profiles[name], False
        iam = self.api.client("iam")
        created = False
        try:
            profile = self.api.call(iam.get_instance_profile, InstanceProfileName=name)["InstanceProfile"]
            has_role = bool(profile.get("Roles"))
        except BadRequest as exc:
            if exc.code != "NoSuchEntity":
                raise
            has_role = False
            tags = [{"Key": TAG_JOB, "Value": boot.job_id}]
            self._ignore_exists(
                iam.create_role,
                RoleName=name,
                AssumeRolePolicyDocument=json.dumps(EC2_TRUST_POLICY),
                Description=what[:1000],
                Tags=tags,
            )
            self._ignore_exists(iam.create_instance_profile, InstanceProfileName=name, Tags=tags)
            created = True
        document = json.dumps(policy)
        self.api.call(iam.put_role_policy, RoleName=name, PolicyName=ROLE_POLICY_NAME, PolicyDocument=document)
        if not has_role:
            self._ignore_exists(iam.add_role_to_instance_profile, InstanceProfileName=name, RoleName=name)
        spec = {"Name": name}
        with self._lock:
            self._profiles[name] = spec
        return spec, created

    def _ignore_exists(self, fn: Any, **kwargs: Any) -> None:
        try:
            self.api.call(fn, **kwargs)
        except BadRequest as exc:
            # EntityAlreadyExists; LimitExceeded when the profile already holds its one role
            if exc.code not in ("EntityAlreadyExists", "LimitExceeded"):
                raise

    def release_job(self, job_id: str) -> None:
        """Delete the job's role and instance profile (once no instance of the job is left)."""
        if self.instance_profile_name:
            return
        self._delete_profile(profile_name(job_id))

    def release_controller(self, store_url: str) -> None:
        """Delete the store's controller-host role and profile (once no host of the store is left)."""
        if self.instance_profile_name:
            return
        self._delete_profile(controller_profile_name(store_url))

    def _delete_profile(self, name: str) -> None:
        iam = self.api.client("iam")
        steps = [
            (iam.remove_role_from_instance_profile, {"InstanceProfileName": name, "RoleName": name}),
            (iam.delete_instance_profile, {"InstanceProfileName": name}),
            (iam.delete_role_policy, {"RoleName": name, "PolicyName": ROLE_POLICY_NAME}),
            (iam.delete_role, {"RoleName": name}),
        ]
        for fn, kwargs in steps:
            try:
                self.api.call(fn, **kwargs)
            except BadRequest as exc:
                if exc.code != "NoSuchEntity":
                    raise
        with self._lock:
            self._profiles.pop(name, None)
