"""The VM's identity on Azure: the user-assigned managed identity it runs as, and its store rights.

A VM without a managed identity gets no IMDS token and cannot read the store (the bootstrap fetches
the Agent package with it): `check` and `launch` refuse such a configuration and say what to create.

Scoping, and why this way: an Azure role assignment's ABAC condition can test the blob's path
(`@Resource[...blobs:path] StringStartsWith`) but not which VM asks, and a SAS cannot be limited to
a prefix on a flat-namespace account; so per-job isolation needs **one user-assigned identity per
job** with "Storage Blob Data Contributor" conditioned on its own `jobs/<id>/` path, and "Storage
Blob Data Reader" conditioned on the shared `agent/` and `data/` paths (read-only to every VM; they
are also verified by sha256 before use). `job_assignments` writes those assignments; `allowed`
evaluates them (Azurite does not enforce RBAC, so the tests read the assignments back from the ARM
fake and check them with this evaluator).

The provider makes that identity at a job's first launch (`ensure_job_identity`: ARM PUTs of the
identity and of the two role assignments, condition version 2.0), gives it to the job's VMs, and
deletes all three at the job's end (`release_job_identity`). Calls go through the compute client's
azure-core pipeline (its credential, retries and endpoint): no other dependency. A job with
`${VAR}` secrets runs as its own identity too: the secret store makes it first
(`ensure_job_identity` again, from clouds/azure/secrets.py) and grants that identity alone on the
job's Key Vault secret. The configured `azure.identity` stays required: it is the fallback for a
store off Blob storage (no container to scope).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

IDENTITY_RX = re.compile(
    r"^/subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft\.managedidentity/"
    r"userassignedidentities/[^/]+$",
    re.IGNORECASE,
)
DOC = "docs/providers/azure.md#permissions"
BLOB_PATH = "@Resource[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:path]"
WRITE = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write"
READ = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read"
DELETE = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete"
ADD = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/add/action"
MOVE = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/move/action"

ROLE_ACTIONS = {  # the blob data actions of the two built-in roles spotrun assigns
    "Storage Blob Data Contributor": {READ, WRITE, DELETE, ADD, MOVE},
    "Storage Blob Data Reader": {READ},
}
ROLE_IDS = {  # the built-in role definitions' ids (the same in every subscription)
    "Storage Blob Data Contributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "Storage Blob Data Reader": "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1",
}


@dataclass(frozen=True)
class Assignment:
    role: str
    principal: str
    prefixes: tuple[str, ...]  # blob-path prefixes inside the container

    def condition(self) -> str:
        """The ABAC condition (version 2.0) as `az role assignment create --condition` takes it."""
        tests = " OR ".join(f"{BLOB_PATH} StringStartsWith '{p}'" for p in self.prefixes)
        # every blob action of the role is conditioned (a delete left out would be unrestricted)
        actions = " AND ".join(f"!(ActionMatches{{'{a}'}})" for a in sorted(ROLE_ACTIONS[self.role]))
        return f"(({actions}) OR ({tests}))"


def _prefix(store_url: str) -> str:
    rest = store_url.split("://", 1)[-1]
    _, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def job_assignments(store_url: str, job_id: str, principal: str) -> list[Assignment]:
    """What job `job_id`'s identity gets on the store container."""
    root = _prefix(store_url)
    return [
        Assignment("Storage Blob Data Contributor", principal, (f"{root}jobs/{job_id}/",)),
        Assignment("Storage Blob Data Reader", principal, (f"{root}agent/", f"{root}data/")),
    ]


def allowed(assignments: list[Assignment], principal: str, action: str, blob_path: str) -> bool:
    return any(
        a.principal == principal
        and action in ROLE_ACTIONS.get(a.role, set())
        and any(blob_path.startswith(p) for p in a.prefixes)
        for a in assignments
    )


def missing(identity: str | None) -> list[str]:
    """What the configuration lacks for a VM to read its job's store prefix (empty: nothing)."""
    if not identity:
        return [
            "azure.identity: the VMs get no managed identity and cannot read the store. Create one "
            "(az identity create -g <group> -n spotrun-runner) and assign it Storage Blob Data Contributor "
            f"on the job's path and Storage Blob Data Reader on agent/ and data/ ({DOC})"
        ]
    if not IDENTITY_RX.match(identity):
        return [
            f"azure.identity {identity!r} is not a user-assigned identity's resource id "
            f"(/subscriptions/.../providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>) ({DOC})"
        ]
    return []


def require(identity: str | None) -> None:
    """Raise AuthError (exit 2) when no usable identity is configured."""
    from spotrun.clouds.base import AuthError

    problems = missing(identity)
    if problems:
        raise AuthError("; ".join(problems), code="identity")


IDENTITY_API = "2023-01-31"  # Microsoft.ManagedIdentity


def check_items(provider: Any) -> list[str]:
    """The provider check's identity line: not configured, malformed, or not there (one ARM GET)."""
    identity = getattr(provider, "identity", None)
    problems = missing(identity)
    if problems:
        return problems
    from azure.core.exceptions import AzureError
    from azure.core.rest import HttpRequest

    request = HttpRequest("GET", f"{identity}?api-version={IDENTITY_API}")
    try:
        status = provider.compute.send_request(request).status_code
    except AzureError as e:  # unreachable: the provider check reports the endpoint itself
        return [f"azure.identity could not be read: {e}"]
    if status == 404:
        name = str(identity).rsplit("/", 1)[-1]
        return [f"azure.identity {identity} does not exist: create it (az identity create -n {name}) ({DOC})"]
    if status in (401, 403):
        return [
            f"azure.identity {identity} cannot be read by spotrun's credential "
            f"(needs Microsoft.ManagedIdentity/userAssignedIdentities/read) ({DOC})"
        ]
    return []


# ---------------------------------------------------------------------- the per-job identity

ROLE_API = "2022-04-01"  # Microsoft.Authorization/roleAssignments (conditions need >= 2020-04-01-preview)
TAG_JOB = "spotrun-job"
TAG_STORE = "spotrun-store"
TAG_SCOPE = "spotrun-scope"


def uses_job_identity(boot: Any) -> bool:
    """Does this launch run its VM as a per-job identity? Only for a store on Blob storage (there
    is a container to scope); a job with `${VAR}` secrets too (its secret is granted to it).
    Never for the controller host (`controller: cloud`): it launches and deletes VMs, which a
    store-scoped identity cannot; it runs as the configured `azure.identity`, which the user gives
    the controller's rights (docs/providers/azure.md)."""
    return on_blob(boot.store_url) and getattr(boot, "role", "") != "controller"


def on_blob(store_url: str) -> bool:
    return store_url.startswith("az://")


def job_identity_name(job_id: str) -> str:
    """`spotrun-<job slug>-<8 hex>`: 3-128 letters, digits, '-' and '_', starting alphanumeric."""
    import hashlib

    slug = re.sub(r"[^a-z0-9-]", "-", job_id.lower()).strip("-")[:60].rstrip("-") or "job"
    return f"spotrun-{slug}-{hashlib.sha256(job_id.encode()).hexdigest()[:8]}"


def container_scope(provider: Any, store_url: str) -> str:
    """The store container's resource id, the scope of the job's role assignments. The storage
    account is named by `az://container@account/...` or the environment the controller's store
    reads; it lives in AZURE_STORAGE_RESOURCE_GROUP, else in the provider's resource group."""
    import os
    from urllib.parse import urlparse

    from spotrun.clouds.azure.provider import storage_account_env
    from spotrun.clouds.base import BadRequest

    head = store_url.split("://", 1)[-1].split("/", 1)[0]
    container, _, account = head.partition("@")
    if not account:
        env = storage_account_env(store_url)
        account = env.get("AZURE_STORAGE_ACCOUNT", "")
        url = env.get("AZURE_STORAGE_ACCOUNT_URL", "")
        if url:
            parsed = urlparse(url)
            host = parsed.hostname or ""
            first = host.split(".", 1)[0]
            account = parsed.path.strip("/").split("/", 1)[0] if first.isdigit() or host == "localhost" else first
    if not account:
        raise BadRequest(f"{store_url}: cannot tell the storage account to scope the job's identity", code="identity")
    group = os.environ.get("AZURE_STORAGE_RESOURCE_GROUP") or provider.resource_group
    return (
        f"/subscriptions/{provider.subscription_id}/resourceGroups/{group}/providers/Microsoft.Storage/"
        f"storageAccounts/{account}/blobServices/default/containers/{container}"
    )


def _identity_id(provider: Any, job_id: str) -> str:
    return (
        f"/subscriptions/{provider.subscription_id}/resourceGroups/{provider.resource_group}/providers/"
        f"Microsoft.ManagedIdentity/userAssignedIdentities/{job_identity_name(job_id)}"
    )


def _assignment_path(scope: str, principal: str, role: str) -> str:
    import uuid

    name = uuid.uuid5(uuid.NAMESPACE_URL, f"spotrun:{scope}:{principal}:{role}")
    return f"{scope}/providers/Microsoft.Authorization/roleAssignments/{name}?api-version={ROLE_API}"


def _arm(
    provider: Any, method: str, path: str, what: str, action: str, body: Any = None, *, ok: tuple[str, ...] = ()
) -> Any:
    """One ARM call through the compute client's pipeline (its credential, retries, endpoint);
    an error whose code is in `ok` is no error."""
    from azure.core.exceptions import AzureError
    from azure.core.rest import HttpRequest

    from spotrun.clouds.azure.provider import classify
    from spotrun.clouds.base import AuthError, ProviderError

    request = HttpRequest(method, path, json=body) if body is not None else HttpRequest(method, path)
    try:
        response = provider.compute.send_request(request)
    except AzureError as e:
        raise ProviderError(f"{what}: Azure Resource Manager unreachable: {e}", code="network") from e
    if response.status_code < 400 or response.status_code == 404 and method != "PUT":
        return response
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    if error.get("code") in ok:
        return response
    err = classify(str(error.get("code", "")), f"{what}: {error.get('message', '')}", status=response.status_code)
    if isinstance(err, AuthError):
        err = AuthError(f"{err} (spotrun's credential needs {action}; {DOC})", code="identity")
    raise err


def ensure_job_identity(provider: Any, boot: Any, location: str) -> str:
    """Create job `boot.job_id`'s user-assigned identity (tagged with the job and its store) and
    its two conditioned role assignments on the store container; idempotent. Returns its id."""
    rid = _identity_id(provider, boot.job_id)
    scope = container_scope(provider, boot.store_url)
    body = {"location": location, "tags": {TAG_JOB: boot.job_id, TAG_STORE: boot.store_url, TAG_SCOPE: scope}}
    found = _arm(provider, "GET", f"{rid}?api-version={IDENTITY_API}", "reading the job's identity",
                 "Microsoft.ManagedIdentity/userAssignedIdentities/read")  # fmt: skip
    if found.status_code == 404:
        found = _arm(provider, "PUT", f"{rid}?api-version={IDENTITY_API}", "creating the job's identity",
                     "Microsoft.ManagedIdentity/userAssignedIdentities/write", body)  # fmt: skip
    principal = found.json()["properties"]["principalId"]
    for a in job_assignments(boot.store_url, boot.job_id, principal):
        assignment = {
            "properties": {
                "roleDefinitionId": f"/subscriptions/{provider.subscription_id}/providers/"
                f"Microsoft.Authorization/roleDefinitions/{ROLE_IDS[a.role]}",
                "principalId": principal,
                "principalType": "ServicePrincipal",
                "condition": a.condition(),
                "conditionVersion": "2.0",
                "description": f"spotrun job {boot.job_id}",
            }
        }
        _assign(provider, _assignment_path(scope, principal, a.role), assignment)
    return rid


def _assign(provider: Any, path: str, assignment: dict[str, Any], tries: int = 5) -> None:
    """PUT one role assignment. `principalType` spares most of the wait for a new identity to
    replicate, but ARM may still answer PrincipalNotFound for a few seconds: retried. An
    assignment already there (a resumed job) is no error."""
    from spotrun.clouds.base import BadRequest

    for attempt in range(tries):
        try:
            _arm(provider, "PUT", path, "granting the job's identity", "Microsoft.Authorization/roleAssignments/write",
                 assignment, ok=("RoleAssignmentExists",))  # fmt: skip
            return
        except BadRequest as e:
            if e.code != "PrincipalNotFound" or attempt + 1 == tries:
                raise
            provider.clock.sleep(2.0 * (attempt + 1))


def release_job_identity(provider: Any, job_id: str) -> bool:
    """Delete job `job_id`'s role assignments, then its identity (idempotent; the scope is read
    from the identity's tags). True when there was one."""
    rid = _identity_id(provider, job_id)
    found = _arm(provider, "GET", f"{rid}?api-version={IDENTITY_API}", "reading the job's identity",
                 "Microsoft.ManagedIdentity/userAssignedIdentities/read")  # fmt: skip
    if found.status_code == 404:
        return False
    record = found.json()
    principal, scope = record["properties"]["principalId"], (record.get("tags") or {}).get(TAG_SCOPE, "")
    if scope:
        for role in ROLE_IDS:
            _arm(provider, "DELETE", _assignment_path(scope, principal, role), "removing the job's grant",
                 "Microsoft.Authorization/roleAssignments/delete")  # fmt: skip
    _arm(provider, "DELETE", f"{rid}?api-version={IDENTITY_API}", "deleting the job's identity",
         "Microsoft.ManagedIdentity/userAssignedIdentities/delete")  # fmt: skip
    return True


def leftover_identities(provider: Any) -> dict[str, str]:
    """Per-job identities still in the resource group: job id -> resource id (a crashed
    controller leaves them; `spotrun gc` releases those whose job has ended)."""
    path = (
        f"/subscriptions/{provider.subscription_id}/resourceGroups/{provider.resource_group}/providers/"
        f"Microsoft.ManagedIdentity/userAssignedIdentities?api-version={IDENTITY_API}"
    )
    found: dict[str, str] = {}
    while path:
        page = _arm(
            provider, "GET", path, "listing identities", "Microsoft.ManagedIdentity/userAssignedIdentities/read"
        )
        body = page.json() if page.status_code == 200 else {}
        for item in body.get("value", []):
            job = (item.get("tags") or {}).get(TAG_JOB)
            if job:
                found[job] = item.get("id", "")
        path = body.get("nextLink", "")
    return found
