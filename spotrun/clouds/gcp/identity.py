"""The VM's identity on Google Cloud: the service account it runs as, and what it may do in the store.

A VM without a service account has no token and cannot read the store (the bootstrap fetches the
Agent package with it): `check` and `launch` refuse such a configuration and say what to create.

Scoping, and why this way: Cloud Storage IAM conditions can test the object's name
(`resource.name.startsWith(...)`) but not which VM asks, so one account shared by every job could
write every job's prefix. Per-job isolation therefore needs **one service account per job**, each
bound with a condition on its own `jobs/<id>/` prefix, plus read-only (`objectViewer`) bindings on
the shared `agent/` and `data/` prefixes; the shared objects are also verified by sha256 before
use (vmboot checks the Agent package, `agent.fetch.fetch_verified` bundles and data). `job_bindings`
writes that policy; `allowed` evaluates it (the storage fakes do not enforce IAM, so the tests check
the policy with this evaluator). The default compute service account is refused: it is Editor on
the project.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

EMAIL_RX = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
DEFAULT_COMPUTE_SA = "-compute@developer.gserviceaccount.com"
DOC = "docs/providers/gcp.md#permissions"

# What the two roles spotrun binds allow on objects (Cloud Storage's predefined roles).
ROLE_PERMISSIONS = {
    "roles/storage.objectUser": {
        "storage.objects.get",
        "storage.objects.create",
        "storage.objects.delete",
        "storage.objects.update",
        "storage.objects.list",
    },
    "roles/storage.objectViewer": {"storage.objects.get", "storage.objects.list"},
}


@dataclass(frozen=True)
class Binding:
    role: str
    member: str
    prefixes: tuple[str, ...]  # object-name prefixes the condition allows ("" = the whole bucket)

    def condition(self, bucket: str) -> dict[str, str]:
        """The IAM condition as Cloud Storage takes it (CEL on `resource.name`)."""
        tests = " || ".join(
            f'resource.name.startsWith("projects/_/buckets/{bucket}/objects/{p}")' for p in self.prefixes
        )
        return {"title": f"spotrun-{self.role.rsplit('.', 1)[-1]}", "expression": tests}


def _split(store_url: str) -> tuple[str, str]:
    rest = store_url.split("://", 1)[-1]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def job_service_account(job_id: str, project: str) -> str:
    """The per-job account's email: `spotrun-<job slug>` (6-30 characters, GCE's rule)."""
    slug = re.sub(r"[^a-z0-9-]", "-", job_id.lower()).strip("-")[:20].rstrip("-") or "job"
    return f"spotrun-{slug}@{project}.iam.gserviceaccount.com"


def job_bindings(store_url: str, job_id: str, member: str) -> list[Binding]:
    """What job `job_id`'s VM account gets on the store bucket: read/write on its own prefix,
    read-only on the shared `agent/` and `data/`."""
    _, root = _split(store_url)
    return [
        Binding("roles/storage.objectUser", member, (f"{root}jobs/{job_id}/",)),
        Binding("roles/storage.objectViewer", member, (f"{root}agent/", f"{root}data/")),
    ]


def allowed(bindings: list[Binding], member: str, permission: str, object_name: str) -> bool:
    """Does the policy let `member` do `permission` on object `object_name`? (IAM: any binding.)"""
    return any(
        b.member == member
        and permission in ROLE_PERMISSIONS.get(b.role, set())
        and any(object_name.startswith(p) for p in b.prefixes)
        for b in bindings
    )


def missing(service_account: str | None) -> list[str]:
    """What the configuration lacks for a VM to read its job's store prefix (empty: nothing)."""
    if not service_account:
        return [
            "gcp.service_account: the VMs get no identity and cannot read the store. Create one "
            "(gcloud iam service-accounts create spotrun-runner) and grant it roles/storage.objectUser "
            f"on the job prefix and roles/storage.objectViewer on agent/ and data/ ({DOC})"
        ]
    if service_account.endswith(DEFAULT_COMPUTE_SA):
        return [
            f"gcp.service_account {service_account} is the default compute service account (Editor on "
            f"the project): create a spotrun one limited to the store ({DOC})"
        ]
    if not EMAIL_RX.match(service_account):
        return [f"gcp.service_account {service_account!r} is not a service account email ({DOC})"]
    return []


def require(service_account: str | None) -> None:
    """Raise AuthError (exit 2) when no usable identity is configured."""
    from spotrun.clouds.base import AuthError

    problems = missing(service_account)
    if problems:
        raise AuthError("; ".join(problems), code="identity")


IAM_ENDPOINT = "https://iam.googleapis.com"


def check_items(provider: Any) -> list[str]:
    """The provider check's identity line: not configured, unusable, or not there (one IAM GET)."""
    email = getattr(provider, "service_account", None)
    problems = missing(email)
    if problems:
        return problems
    from google.auth.transport.requests import AuthorizedSession

    credentials = getattr(provider, "_credentials", None)
    if credentials is None:
        import google.auth

        credentials, _ = google.auth.default()
    base = getattr(provider, "endpoint", None) or IAM_ENDPOINT
    url = f"{base}/v1/projects/-/serviceAccounts/{email}"
    try:
        status = AuthorizedSession(credentials).get(url, timeout=30).status_code
    except Exception as e:  # noqa: BLE001 -- transport or credentials: say so, do not crash check
        return [f"gcp.service_account {email} could not be read: {type(e).__name__}: {e}"]
    if status == 404:
        name = email.split("@", 1)[0]
        return [
            f"gcp.service_account {email} does not exist: create it (gcloud iam service-accounts create {name}) ({DOC})"
        ]
    if status in (401, 403):
        return [
            f"gcp.service_account {email} cannot be read by spotrun's credential "
            f"(needs iam.serviceAccounts.get) ({DOC})"
        ]
    return []
