"""The VM's identity on Azure: the user-assigned managed identity it runs as, and its store rights.

A VM without a managed identity gets no IMDS token and cannot read the store (the bootstrap fetches
the Agent package with it): `check` and `launch` refuse such a configuration and say what to create.

Scoping, and why this way: an Azure role assignment's ABAC condition can test the blob's path
(`@Resource[...blobs:path] StringStartsWith`) but not which VM asks, and a SAS cannot be limited to
a prefix on a flat-namespace account; so per-job isolation needs **one user-assigned identity per
job** with "Storage Blob Data Contributor" conditioned on its own `jobs/<id>/` path, and "Storage
Blob Data Reader" conditioned on the shared `agent/` and `data/` paths (read-only to every VM; they
are also verified by sha256 before use). `job_assignments` writes those assignments; `allowed`
evaluates them (Azurite does not enforce RBAC, so the tests check the policy with this evaluator).
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

ROLE_ACTIONS = {  # the data actions of the two built-in roles spotrun assigns
    "Storage Blob Data Contributor": {READ, WRITE, DELETE},
    "Storage Blob Data Reader": {READ},
}


@dataclass(frozen=True)
class Assignment:
    role: str
    principal: str
    prefixes: tuple[str, ...]  # blob-path prefixes inside the container

    def condition(self) -> str:
        """The ABAC condition (version 2.0) as `az role assignment create --condition` takes it."""
        tests = " OR ".join(f"{BLOB_PATH} StringStartsWith '{p}'" for p in self.prefixes)
        return f"((!(ActionMatches{{'{WRITE}'}}) AND !(ActionMatches{{'{READ}'}})) OR ({tests}))"


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
