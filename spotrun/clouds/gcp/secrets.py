"""A job's `${VAR}` secrets in Google Secret Manager: one secret per job, `spotrun-<job id>`.

Controller side (google-cloud-secret-manager over REST, the provider's credentials and project):

* `put`: create the secret (automatic replication, label `spotrun-job`) if it is not there, add a
  version holding the values as one JSON object, and set the secret's IAM policy to exactly one
  binding: `roles/secretmanager.secretAccessor` for the VM's service account. That is the job's own
  account (clouds/gcp/identity.py, made here first if the launch has not yet: the grant needs it)
  when the store is on GCS, else the configured `gcp.service_account`. Project-level roles aside,
  nobody else is granted anything on it, so another job's VM cannot read it.
* `delete`: delete the secret with all its versions; a missing one is fine.

VM side (`fetch`, standard library only, Python 3.9): an access token for the VM's service account
from the metadata server, then `versions/latest:access` on the Secret Manager REST API. The VM is
launched with the `cloud-platform` scope when its job has secrets (Secret Manager takes no
narrower one); its IAM rights stay those of the service account.

`SECRET_MANAGER_EMULATOR_HOST` (`http://host:port`) points both sides at another server (tests);
`GCE_METADATA_HOST` (as google-auth reads it) points the VM at another metadata server.
"""

from __future__ import annotations

import base64
import os
import time
from typing import Any

from spotrun.clouds.secrets import SecretsError, decode_values, describe_error, encode_values, get_json, secret_name

API = "https://secretmanager.googleapis.com"
EMULATOR_ENV = "SECRET_MANAGER_EMULATOR_HOST"
_MISSING = object()
ACCESSOR_ROLE = "roles/secretmanager.secretAccessor"
SECRETS_SCOPE = "https://www.googleapis.com/auth/cloud-platform"  # the only scope Secret Manager takes


class _JobStore:
    """What `identity.ensure_job_account` reads of a launch's boot record."""

    def __init__(self, job_id: str, store_url: str) -> None:
        self.job_id = job_id
        self.store_url = store_url


def label_value(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.lower())[:63]


class GCPSecrets:
    cloud = "gcp"

    def __init__(
        self, project: str, *, service_account: str | None, credentials: Any = None, endpoint: str | None = None
    ) -> None:
        self.project = project
        self.service_account = service_account
        self.credentials = credentials
        self.endpoint = endpoint or os.environ.get(EMULATOR_ENV) or None
        self._client: Any = None
        self.provider: Any = None  # set by from_provider: it can make the job's own account

    @classmethod
    def from_provider(cls, provider: Any) -> GCPSecrets:
        project = provider.project  # resolves default credentials when none were given
        store = cls(project, service_account=provider.service_account, credentials=provider._credentials)
        store.provider = provider
        return store

    def grantee(self, job_id: str, store_url: str = "") -> str:
        """The account the job's VM runs as, which alone may read its secret: the job's own (made
        now if absent; idempotent) for a store on GCS, else the configured one."""
        from spotrun.clouds.gcp import identity

        if self.provider is not None and identity.on_gcs(store_url):
            from spotrun.clouds.base import AuthError, BadRequest, ProviderError

            boot = _JobStore(job_id, store_url)
            try:
                return identity.ensure_job_account(self.provider, boot)
            except (AuthError, BadRequest) as e:
                raise SecretsError(f"gcp: making the job's service account: {e}", permanent=True) from None
            except ProviderError as e:
                raise SecretsError(f"gcp: making the job's service account: {e}") from None
        if not self.service_account:
            raise SecretsError(
                "gcp: a job with ${VAR} secrets needs gcp.service_account: the VM reads them as that account",
                permanent=True,
            )
        return self.service_account

    # -------------------------------------------------------------- controller side

    def client(self) -> Any:
        if self._client is None:
            from google.cloud import secretmanager

            options = {"api_endpoint": self.endpoint} if self.endpoint else None
            self._client = secretmanager.SecretManagerServiceClient(
                credentials=self.credentials, transport="rest", client_options=options
            )
        return self._client

    def path(self, job_id: str) -> str:
        return f"projects/{self.project}/secrets/{secret_name(job_id, limit=255)}"

    def _call(self, what: str, fn: Any, *, conflict_ok: bool = False, missing_ok: bool = False, **kwargs: Any) -> Any:
        """One API call; its failure as a SecretsError (permanent: credentials, rights, a bad request)."""
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        try:
            return fn(**kwargs)
        except gexc.NotFound:
            if not missing_ok:
                raise SecretsError(f"gcp: {what}: not found") from None
            return _MISSING
        except gexc.Conflict:  # 409 ALREADY_EXISTS (AlreadyExists over gRPC)
            if not conflict_ok:
                raise SecretsError(f"gcp: {what}: already exists") from None
            return None
        except (gexc.PermissionDenied, gexc.Unauthenticated, gexc.InvalidArgument) as e:
            raise SecretsError(f"gcp: {what}: {e.message}", permanent=True) from None
        except gexc.GoogleAPICallError as e:
            raise SecretsError(f"gcp: {what}: {e.message}") from None
        except auth_exc.GoogleAuthError as e:  # a 401 the credentials could not refresh past
            raise SecretsError(f"gcp: {what}: credentials rejected ({type(e).__name__})", permanent=True) from None

    def put(self, job_id: str, values: dict[str, str], *, store_url: str = "", region: str = "") -> dict[str, str]:
        """Store the values as a new version and grant the job's VM account on the secret."""
        account = self.grantee(job_id, store_url)
        client, name = self.client(), self.path(job_id)
        secret = {"replication": {"automatic": {}}, "labels": {"spotrun-job": label_value(job_id)}}
        secret_id = name.rsplit("/", 1)[-1]
        create = client.create_secret
        parent = f"projects/{self.project}"
        self._call(
            "creating the job's secret", create, conflict_ok=True, parent=parent, secret_id=secret_id, secret=secret
        )
        payload = {"data": encode_values(values).encode()}
        self._call("adding the secret's version", client.add_secret_version, parent=name, payload=payload)
        self._grant(name, account)
        return {"cloud": self.cloud, "name": name}

    def grant(self, job_id: str, *, store_url: str = "", region: str = "") -> dict[str, str]:
        """(Re)grant the job's VM account on a secret stored by an earlier launch; its reference."""
        account = self.grantee(job_id, store_url)
        self._grant(self.path(job_id), account)
        return {"cloud": self.cloud, "name": self.path(job_id)}

    def _grant(self, name: str, account: str) -> None:
        policy = {"bindings": [{"role": ACCESSOR_ROLE, "members": [f"serviceAccount:{account}"]}]}
        self._call(
            "granting the VM's service account",
            self.client().set_iam_policy,
            request={"resource": name, "policy": policy},
        )

    def find(self, job_id: str) -> dict[str, str] | None:
        """The reference to the job's secret if the store holds one (its value is not read)."""
        found = self._call(
            "looking up the job's secret", self.client().get_secret, missing_ok=True, name=self.path(job_id)
        )
        return None if found is _MISSING else {"cloud": self.cloud, "name": self.path(job_id)}

    def delete(self, job_id: str) -> bool:
        """True when a secret (all its versions) was deleted, False when there was none."""
        done = self._call(
            "deleting the job's secret", self.client().delete_secret, missing_ok=True, name=self.path(job_id)
        )
        return done is not _MISSING

    # -------------------------------------------------------------- VM side

    @staticmethod
    def fetch(ref: dict[str, str], *, tries: int = 5, wait: float = 2.0) -> dict[str, str]:
        """The job's values, read as the VM's service account (metadata token, then REST)."""
        metadata = os.environ.get("GCE_METADATA_HOST") or "metadata.google.internal"
        endpoint = (os.environ.get(EMULATOR_ENV) or API).rstrip("/")
        token_url = f"http://{metadata}/computeMetadata/v1/instance/service-accounts/default/token"
        for attempt in range(tries):
            try:
                token = get_json(token_url, {"Metadata-Flavor": "Google"})["access_token"]
                body = get_json(
                    f"{endpoint}/v1/{ref['name']}/versions/latest:access", {"Authorization": f"Bearer {token}"}
                )
                return decode_values(base64.b64decode(body["payload"]["data"]).decode())
            except (OSError, ValueError, KeyError) as e:  # urllib's HTTPError/URLError are OSErrors
                if attempt + 1 >= tries:
                    raise SecretsError(f"gcp: reading the job's secret failed ({describe_error(e)})") from None
                time.sleep(wait * (2**attempt))
        raise AssertionError("unreachable")
