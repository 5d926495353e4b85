"""A job's `${VAR}` secrets in AWS Secrets Manager: one secret per job, `spotrun/<job id>`.

Why Secrets Manager and not SSM Parameter Store SecureString: a secret has a *resource policy*,
so the secret itself can refuse every principal but the job's instance role (defence in depth
over the role's own grant); deletion is immediate with `ForceDeleteWithoutRecovery`; and its
price is small for a job's lifetime ($0.40 per secret-month, pro-rated by the hour, plus $0.05 per
10,000 API calls). A SecureString parameter is free, but can only be guarded by identity policies.

Controller side (boto3 through the provider's `AWSApi`, errors translated):

* `put`: create the secret (or a new version of it), tagged `spotrun:job`, and a resource policy
  that denies `GetSecretValue` to every principal but the job's role `spotrun-<job>` (or the role
  of the configured instance profile). The role's own grant (`secret_read_statement`) is part of
  the role policy that `resources.LaunchResources.instance_profile` writes.
* `delete`: `DeleteSecret(ForceDeleteWithoutRecovery=True)`; a missing secret is fine.

VM side (`fetch`): `GetSecretValue` with boto3 (installed with the Agent package on AWS) under the
instance profile's role credentials from IMDS. Python 3.9.
"""

from __future__ import annotations

import json
import time
from typing import Any

from spotrun.clouds.secrets import SecretsError, decode_values, encode_values

ROLE_ACTION = "secretsmanager:GetSecretValue"


def aws_secret_name(job_id: str) -> str:
    """`spotrun/<job id>` (Secrets Manager allows [A-Za-z0-9/_+=.@-], 512 characters)."""
    from spotrun.clouds.secrets import secret_name

    return secret_name(job_id, sep="/", limit=480)


def secret_read_statement(job_id: str) -> dict[str, Any]:
    """The statement of the job's instance role that lets its VMs read the job's secret and no
    other (a secret's ARN is its name plus `-` and six random characters)."""
    return {
        "Sid": "JobSecret",
        "Effect": "Allow",
        "Action": ROLE_ACTION,
        "Resource": f"arn:aws:secretsmanager:*:*:secret:{aws_secret_name(job_id)}-??????",
    }


def resource_policy(role_arn: str) -> dict[str, Any]:
    """The secret's own policy: nobody but the job's role may read its value."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "OnlyTheJobsInstances",
                "Effect": "Deny",
                "Principal": "*",
                "Action": ROLE_ACTION,
                "Resource": "*",
                "Condition": {"StringNotEquals": {"aws:PrincipalArn": role_arn}},
            }
        ],
    }


class AWSSecrets:
    cloud = "aws"

    def __init__(self, api: Any, *, instance_profile: str | None = None) -> None:
        """`api`: a `spotrun.clouds.aws.api.AWSApi` (region, session, retries, error translation)."""
        self.api = api
        self.instance_profile = instance_profile

    @classmethod
    def from_provider(cls, provider: Any) -> AWSSecrets:
        return cls(provider.api, instance_profile=provider.resources.instance_profile_name)

    # -------------------------------------------------------------- controller side

    def _client(self) -> Any:
        return self.api.client("secretsmanager")

    def role_arn(self, job_id: str) -> str:
        """The ARN of the role the job's VMs run as: the job's own, or the configured profile's."""
        from spotrun.clouds.aws.resources import profile_name

        if self.instance_profile:
            iam = self.api.client("iam")
            name = self.instance_profile.rsplit("/", 1)[-1]
            roles = self.api.call(iam.get_instance_profile, InstanceProfileName=name)["InstanceProfile"]["Roles"]
            if not roles:
                raise SecretsError(f"aws: instance profile {name} has no role to read the job's secret", permanent=True)
            return roles[0]["Arn"]
        account = self.api.call(self.api.client("sts").get_caller_identity)["Account"]
        return f"arn:aws:iam::{account}:role/{profile_name(job_id)}"

    def put(self, job_id: str, values: dict[str, str]) -> dict[str, str]:
        from spotrun.clouds.base import AuthError, ProviderError

        client, name = self._client(), aws_secret_name(job_id)
        try:
            role = self.role_arn(job_id)
            try:
                arn = self.api.call(
                    client.create_secret,
                    Name=name,
                    SecretString=encode_values(values),
                    Description=f"spotrun job {job_id}: its ${{VAR}} env (deleted when the job ends)",
                    Tags=[{"Key": "spotrun:job", "Value": job_id}],
                )["ARN"]
            except ProviderError as e:
                if e.code != "ResourceExistsException":
                    raise
                arn = self.api.call(client.put_secret_value, SecretId=name, SecretString=encode_values(values))["ARN"]
            self.api.call(client.put_resource_policy, SecretId=arn, ResourcePolicy=json.dumps(resource_policy(role)))
        except ProviderError as e:
            permanent = isinstance(e, AuthError) or e.code in ("AccessDeniedException", "AccessDenied")
            raise SecretsError(f"aws: storing the job's secret {name}: {e}", permanent=permanent) from None
        return {"cloud": self.cloud, "region": self.api.default_region() or "", "id": arn}

    def find(self, job_id: str) -> dict[str, str] | None:
        """The reference to the job's secret if the store holds one (its value is not read)."""
        from spotrun.clouds.base import ProviderError

        try:
            arn = self.api.call(self._client().describe_secret, SecretId=aws_secret_name(job_id))["ARN"]
        except ProviderError as e:
            if e.code == "ResourceNotFoundException":
                return None
            raise SecretsError(f"aws: looking up the job's secret: {e}") from None
        return {"cloud": self.cloud, "region": self.api.default_region() or "", "id": arn}

    def delete(self, job_id: str) -> bool:
        """Deleted at once, without the recovery window. Always True: with ForceDeleteWithoutRecovery
        AWS answers success for a secret that is not there."""
        from spotrun.clouds.base import ProviderError

        try:
            self.api.call(
                self._client().delete_secret, SecretId=aws_secret_name(job_id), ForceDeleteWithoutRecovery=True
            )
            return True
        except ProviderError as e:
            if e.code == "ResourceNotFoundException":
                return False
            raise SecretsError(f"aws: deleting the job's secret: {e}") from None

    # -------------------------------------------------------------- VM side

    @staticmethod
    def fetch(ref: dict[str, str], *, tries: int = 6, wait: float = 2.0) -> dict[str, str]:
        """The job's values, read with the instance role. A role created just before the launch
        may take seconds to be usable everywhere (IAM is eventually consistent): retried."""
        import boto3

        client = boto3.client("secretsmanager", region_name=ref.get("region") or None)
        for attempt in range(tries):
            try:
                return decode_values(client.get_secret_value(SecretId=ref["id"])["SecretString"])
            except Exception as e:  # noqa: BLE001 -- botocore's errors; the last one is raised
                if attempt + 1 >= tries:
                    code = getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__)
                    raise SecretsError(f"aws: reading the job's secret failed ({code})") from None
                time.sleep(wait * (2**attempt))
        raise AssertionError("unreachable")
