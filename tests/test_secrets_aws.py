"""AWS Secrets Manager as the job's secret store, on moto's server through real boto3: put with a
resource policy for the job's role only, a new version on a second put, read back the way the VM
does, forced deletion; and the role's grant scoped to the job's own secret."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spotrun.clouds.aws.provider import AWSProvider
from spotrun.clouds.aws.secrets import AWSSecrets, aws_secret_name, resource_policy, secret_read_statement
from spotrun.clouds.secrets import SecretsError
from tests.fakes.moto_server import ACCOUNT_ID, MotoServer, aws, fast_session, moto_server  # noqa: F401

REGION = "us-east-1"
VALUE = "wandb-0123456789abcdef-not-in-any-log"


@pytest.fixture
def store(aws: MotoServer) -> AWSSecrets:  # noqa: F811
    return AWSSecrets.from_provider(AWSProvider(region=REGION, session=fast_session(REGION), regions=[REGION]))


def sm() -> Any:
    return fast_session(REGION).client("secretsmanager")


def test_put_find_fetch_delete(store: AWSSecrets) -> None:
    assert store.find("job-1") is None
    ref = store.put("job-1", {"WANDB_API_KEY": VALUE})
    assert ref["cloud"] == "aws" and ref["region"] == REGION
    assert ref["id"].startswith(f"arn:aws:secretsmanager:{REGION}:{ACCOUNT_ID}:secret:spotrun/job-1-")
    assert VALUE not in json.dumps(ref)  # a reference, never the value
    described = sm().describe_secret(SecretId=ref["id"])
    assert {"Key": "spotrun:job", "Value": "job-1"} in described["Tags"]
    policy = json.loads(sm().get_resource_policy(SecretId=ref["id"])["ResourcePolicy"])
    assert policy == resource_policy(f"arn:aws:iam::{ACCOUNT_ID}:role/spotrun-job-1")
    assert store.find("job-1") == ref
    assert AWSSecrets.fetch(ref) == {"WANDB_API_KEY": VALUE}  # what the Agent does on the VM

    again = store.put("job-1", {"WANDB_API_KEY": "rotated"})  # a resume with a new value
    assert again["id"] == ref["id"]
    assert AWSSecrets.fetch(ref) == {"WANDB_API_KEY": "rotated"}

    assert store.delete("job-1") is True
    assert store.find("job-1") is None
    store.delete("job-1")  # already gone: fine (AWS answers a forced delete of no secret with success)
    with pytest.raises(SecretsError, match="reading the job's secret failed"):
        AWSSecrets.fetch(ref, tries=1)


def test_the_roles_grant_names_only_the_jobs_secret() -> None:
    statement = secret_read_statement("job-1")
    assert statement["Action"] == "secretsmanager:GetSecretValue"
    assert statement["Resource"] == f"arn:aws:secretsmanager:*:*:secret:{aws_secret_name('job-1')}-??????"
    assert aws_secret_name("job-10") != aws_secret_name("job-1")  # job-10's ARN does not match job-1's pattern
    deny = resource_policy("arn:aws:iam::1:role/r")["Statement"][0]
    assert (deny["Effect"], deny["Principal"], deny["Condition"]) == (
        "Deny",
        "*",
        {"StringNotEquals": {"aws:PrincipalArn": "arn:aws:iam::1:role/r"}},
    )


def test_a_configured_instance_profile_lends_its_role(aws: MotoServer) -> None:  # noqa: F811
    iam = fast_session(REGION).client("iam")
    iam.create_role(RoleName="my-role", AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName="my-profile")
    iam.add_role_to_instance_profile(InstanceProfileName="my-profile", RoleName="my-role")
    provider = AWSProvider(region=REGION, session=fast_session(REGION), regions=[REGION], instance_profile="my-profile")
    ref = AWSSecrets.from_provider(provider).put("job-2", {"A": "b"})
    policy = json.loads(sm().get_resource_policy(SecretId=ref["id"])["ResourcePolicy"])
    assert policy == resource_policy(f"arn:aws:iam::{ACCOUNT_ID}:role/my-role")
