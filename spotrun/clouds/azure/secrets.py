"""A job's `${VAR}` secrets in Azure Key Vault: one secret per job, `spotrun-<job id>`.

Key Vault needs a vault: spotrun uses the one named by `SPOTRUN_AZURE_KEY_VAULT` (a vault name in
the provider's resource group, or a vault's full resource id); it must use the Azure RBAC
permission model. `SPOTRUN_AZURE_KEY_VAULT_URL` overrides its data-plane URL (tests; sovereign
clouds), default `https://<name>.vault.azure.net`.

Controller side (azure-keyvault-secrets, the provider's credential; ARM over HTTPS for the grant):

* `put`: set the secret (a new version, tagged `spotrun-job`) and assign the built-in role *Key
  Vault Secrets User* to the VM's user-assigned identity **on that one secret** (scope
  `<vault id>/secrets/<name>`), with a role-assignment name derived from job and identity so a
  retried put makes no second one. The VM's identity is the job's own (clouds/azure/identity.py,
  made here first if the launch has not yet: the grant needs its principal) when the store is on
  Blob storage, else the configured `azure.identity`; so another job's VM cannot read the secret.
* `delete`: remove that role assignment (for either identity), delete the secret and purge it
  (soft-delete would keep it for 7-90 days); a vault with purge protection keeps it soft-deleted,
  unreadable, until then.

VM side (`fetch`, standard library only, Python 3.9): a token for `https://vault.azure.net` from
IMDS for the VM's identity (`msi_res_id`), then `GET <vault>/secrets/<name>`.
`SPOTRUN_AZURE_IMDS` points the VM at another IMDS (tests).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

from spotrun.clouds.secrets import SecretsError, decode_values, describe_error, encode_values, get_json, secret_name

VAULT_ENV = "SPOTRUN_AZURE_KEY_VAULT"
VAULT_URL_ENV = "SPOTRUN_AZURE_KEY_VAULT_URL"
IMDS_ENV = "SPOTRUN_AZURE_IMDS"
ARM = "https://management.azure.com"
VAULT_RESOURCE = "https://vault.azure.net"
SECRETS_USER_ROLE = "4633458b-17de-408a-b874-0445c86b69e6"  # built-in "Key Vault Secrets User"
ROLE_API = "2022-04-01"
IDENTITY_API = "2023-01-31"
DATA_API = "7.4"


class AzureSecrets:
    cloud = "azure"

    def __init__(
        self,
        subscription_id: str,
        resource_group: str,
        *,
        identity: str | None,
        credential: Any = None,
        vault: str | None = None,
        vault_url: str | None = None,
        arm_endpoint: str | None = None,
    ) -> None:
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.identity = identity
        self._credential = credential
        vault = vault or os.environ.get(VAULT_ENV) or ""
        if vault and not vault.startswith("/"):
            vault = (
                f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}"
                f"/providers/Microsoft.KeyVault/vaults/{vault}"
            )
        self.vault_id = vault
        name = vault.rsplit("/", 1)[-1]
        url = vault_url or os.environ.get(VAULT_URL_ENV)
        self.vault_url = (url or f"https://{name}.vault.azure.net").rstrip("/")
        # A vault URL given explicitly (a test server, a sovereign cloud) need not be a *.vault.azure.net
        # name, so the client cannot check the challenge's resource against it.
        self._verify_resource = not url
        self.arm = (arm_endpoint or ARM).rstrip("/")
        self._client: Any = None
        self.provider: Any = None  # set by from_provider: it can make the job's own identity

    @classmethod
    def from_provider(cls, provider: Any) -> AzureSecrets:
        store = cls(
            provider.subscription_id,
            provider.resource_group,
            identity=provider.identity,
            credential=provider._credential,
            vault=getattr(provider, "key_vault", None),
            arm_endpoint=provider.endpoint,
        )
        store.provider = provider
        return store

    def grantee(self, job_id: str, store_url: str = "", region: str = "") -> str:
        """The identity the job's VM runs as, which alone may read its secret: the job's own (made
        now in `region` if absent; idempotent) for a store on Blob storage, else the configured one."""
        from spotrun.clouds.azure import identity

        if self.provider is not None and identity.on_blob(store_url) and region:
            from spotrun.clouds.base import AuthError, BadRequest, ProviderError

            boot = _JobStore(job_id, store_url)
            try:
                return identity.ensure_job_identity(self.provider, boot, region)
            except (AuthError, BadRequest) as e:
                raise SecretsError(f"azure: making the job's identity: {e}", permanent=True) from None
            except ProviderError as e:
                raise SecretsError(f"azure: making the job's identity: {e}") from None
        if not self.identity:
            raise SecretsError(
                "azure: a job with ${VAR} secrets needs azure.identity: the VM reads them as that identity",
                permanent=True,
            )
        return self.identity

    # -------------------------------------------------------------- controller side

    @property
    def credential(self) -> Any:
        if self._credential is None:
            from azure.identity import DefaultAzureCredential

            self._credential = DefaultAzureCredential()
        return self._credential

    def client(self) -> Any:
        if self._client is None:
            from azure.keyvault.secrets import SecretClient

            self._client = SecretClient(
                self.vault_url, self.credential, verify_challenge_resource=self._verify_resource
            )
        return self._client

    def _check_config(self) -> None:
        if not self.vault_id:
            raise SecretsError(
                f"azure: a job with ${{VAR}} secrets needs a Key Vault: set {VAULT_ENV} (see docs/providers/azure.md)",
                permanent=True,
            )

    def put(self, job_id: str, values: dict[str, str], *, store_url: str = "", region: str = "") -> dict[str, str]:
        """Store the values as a new version and grant the job's VM identity on the secret."""
        from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

        self._check_config()
        vm_identity = self.grantee(job_id, store_url, region)
        name = secret_name(job_id, limit=127)
        try:
            self.client().set_secret(name, encode_values(values), tags={"spotrun-job": job_id})
        except ClientAuthenticationError as e:
            raise SecretsError(f"azure: storing the job's secret: {_message(e)}", permanent=True) from None
        except HttpResponseError as e:
            permanent = e.status_code in (400, 401, 403)
            raise SecretsError(f"azure: storing the job's secret: {_message(e)}", permanent=permanent) from None
        return self._grant(job_id, vm_identity)

    def grant(self, job_id: str, *, store_url: str = "", region: str = "") -> dict[str, str]:
        """(Re)grant the job's VM identity on a secret stored by an earlier launch; its reference."""
        self._check_config()
        return self._grant(job_id, self.grantee(job_id, store_url, region))

    def _grant(self, job_id: str, vm_identity: str) -> dict[str, str]:
        name = secret_name(job_id, limit=127)
        principal = self._arm("GET", f"{vm_identity}?api-version={IDENTITY_API}", "reading the VM identity")
        body = {
            "properties": {
                "roleDefinitionId": f"/subscriptions/{self.subscription_id}/providers/Microsoft.Authorization"
                f"/roleDefinitions/{SECRETS_USER_ROLE}",
                "principalId": principal["properties"]["principalId"],
                "principalType": "ServicePrincipal",
            }
        }
        # 409 RoleAssignmentExists: the identity already holds the role on this secret (another name)
        self._arm("PUT", self._assignment(job_id, vm_identity), "granting the VM identity", body, ok=(409,))
        return {"cloud": self.cloud, "vault": self.vault_url, "name": name, "identity": vm_identity}

    def _identities(self, job_id: str) -> list[str]:
        """Every identity a grant on the job's secret may name: the job's own, the configured one."""
        found = [self.identity] if self.identity else []
        if self.provider is not None:
            from spotrun.clouds.azure import identity

            found.insert(0, identity._identity_id(self.provider, job_id))
        return found

    def _assignment(self, job_id: str, vm_identity: str) -> str:
        name = uuid.uuid5(uuid.NAMESPACE_URL, f"spotrun:{self.vault_id}:{job_id}:{vm_identity}")
        scope = f"{self.vault_id}/secrets/{secret_name(job_id, limit=127)}"
        return f"{scope}/providers/Microsoft.Authorization/roleAssignments/{name}?api-version={ROLE_API}"

    def _arm(self, method: str, path: str, what: str, body: Any = None, *, ok: tuple[int, ...] = ()) -> Any:
        """One ARM call with the controller's credential; an HTTP status in `ok` is no error."""
        try:
            token = self.credential.get_token(f"{ARM}/.default").token
        except Exception as e:  # noqa: BLE001 -- azure-identity's ClientAuthenticationError and kin
            raise SecretsError(f"azure: {what}: no usable credential ({type(e).__name__})", permanent=True) from None
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        request = urllib.request.Request(f"{self.arm}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return None
            detail = _arm_error(e)
            raise SecretsError(
                f"azure: {what}: HTTP {e.code} {detail}", permanent=e.code in (400, 401, 403, 404)
            ) from None
        except OSError as e:
            raise SecretsError(f"azure: {what}: {type(e).__name__}: {e}") from None
        return json.loads(raw) if raw else None

    def find(self, job_id: str) -> dict[str, str] | None:
        """The reference to the job's secret if the vault holds one (its value is not read)."""
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        if not self.vault_id:
            return None
        name = secret_name(job_id, limit=127)
        try:  # the versions' properties: never the value
            if not any(True for _ in self.client().list_properties_of_secret_versions(name)):
                return None
        except ResourceNotFoundError:
            return None
        except HttpResponseError as e:
            raise SecretsError(f"azure: looking up the job's secret: {_message(e)}") from None
        return {"cloud": self.cloud, "vault": self.vault_url, "name": name, "identity": self.identity or ""}

    def delete(self, job_id: str) -> bool:
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        if not self.vault_id:
            return False
        for vm_identity in self._identities(job_id):
            self._arm("DELETE", self._assignment(job_id, vm_identity), "removing the VM identity's grant", ok=(404,))
        name, client = secret_name(job_id, limit=127), self.client()
        try:
            client.begin_delete_secret(name).wait(timeout=60)
        except ResourceNotFoundError:
            return False
        except HttpResponseError as e:
            raise SecretsError(f"azure: deleting the job's secret: {_message(e)}") from None
        try:
            client.purge_deleted_secret(name)
        except HttpResponseError as e:  # purge protection, or no purge right: it stays soft-deleted
            if e.status_code not in (403, 409):
                raise SecretsError(f"azure: purging the job's deleted secret: {_message(e)}") from None
        return True

    # -------------------------------------------------------------- VM side

    @staticmethod
    def fetch(ref: dict[str, str], *, tries: int = 5, wait: float = 2.0) -> dict[str, str]:
        """The job's values, read as the VM's managed identity (IMDS token, then the vault)."""
        imds = (os.environ.get(IMDS_ENV) or "http://169.254.169.254").rstrip("/")
        query = urllib.parse.urlencode(
            {"api-version": "2018-02-01", "resource": VAULT_RESOURCE, "msi_res_id": ref.get("identity", "")}
        )
        for attempt in range(tries):
            try:
                token = get_json(f"{imds}/metadata/identity/oauth2/token?{query}", {"Metadata": "true"})
                url = f"{ref['vault']}/secrets/{ref['name']}?api-version={DATA_API}"
                body = get_json(url, {"Authorization": f"Bearer {token['access_token']}"})
                return decode_values(body["value"])
            except (OSError, ValueError, KeyError) as e:  # urllib's HTTPError/URLError are OSErrors
                if attempt + 1 >= tries:
                    raise SecretsError(f"azure: reading the job's secret failed ({describe_error(e)})") from None
                time.sleep(wait * (2**attempt))
        raise AssertionError("unreachable")


class _JobStore:
    """What `identity.ensure_job_identity` reads of a launch's boot record."""

    def __init__(self, job_id: str, store_url: str) -> None:
        self.job_id = job_id
        self.store_url = store_url


def _message(error: Any) -> str:
    return str(getattr(error, "message", "") or type(error).__name__)[:300]


def _arm_error(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
        return str(body.get("error", {}).get("code", ""))
    except ValueError:
        return ""
