"""The VM's identity on Google Cloud: the service account it runs as, and what it may do in the store.

A VM without a service account has no token and cannot read the store (the bootstrap fetches the
Agent package with it): `check` and `launch` refuse such a configuration and say what to create.

Scoping, and why this way: Cloud Storage IAM conditions can test the object's name
(`resource.name.startsWith(...)`) but not which VM asks, so one account shared by every job could
write every job's prefix. Per-job isolation therefore needs **one service account per job**, each
bound with a condition on its own `jobs/<id>/` prefix, plus read-only (`objectViewer`) bindings on
the shared `agent/` and `data/` prefixes; the shared objects are also verified by sha256 before
use (vmboot checks the Agent package, `agent.fetch.fetch_verified` bundles and data). `job_bindings`
writes that policy; `allowed` evaluates it (the storage fakes do not enforce IAM, so the tests read
the policy back from the IAM fake and check it with this evaluator). The default compute service
account is refused: it is Editor on the project.

The provider makes that account at a job's first launch (`ensure_job_account`: IAM REST create,
then the bucket policy rewritten on its etag), runs the job's VMs as it, and deletes both at the
job's end (`release_job_account`). A job with `${VAR}` secrets runs as its own account too: the
secret store makes the account first (`ensure_job_account` again, from clouds/gcp/secrets.py) and
grants that account alone on the job's secret. The configured `gcp.service_account` stays
required: it is the fallback for a store off GCS (no bucket policy to scope).
Calls go through google-auth's AuthorizedSession (it ships with google-cloud-compute).
"""

from __future__ import annotations

import hashlib
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
    """The per-job account's email: `spotrun-<job slug>-<8 hex>` (6-30 characters, IAM's rule)."""
    slug = re.sub(r"[^a-z0-9-]", "-", job_id.lower()).strip("-")[:13].rstrip("-") or "job"
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:8]  # two long ids sharing 13 characters differ
    return f"spotrun-{slug}-{digest}@{project}.iam.gserviceaccount.com"


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


# ---------------------------------------------------------------------- the per-job account

STORAGE_ENDPOINT = "https://storage.googleapis.com"
DESCRIPTION_TAG = "spotrun-job="  # the account's description: `spotrun-job=<id> store=<gs://...>`
ETAG_TRIES = 5  # read-modify-write of the bucket policy, retried on 412 (another writer won)


def uses_job_account(boot: Any) -> bool:
    """Does this launch run its VM as a per-job account? Only for a store on GCS (there is a bucket
    policy to scope); a job with `${VAR}` secrets too (its secret is granted to that account).
    Never for the controller host (`controller: cloud`): it launches and deletes instances, which a
    store-scoped account cannot; it runs as the configured `gcp.service_account`, which the user
    gives the controller's rights (docs/providers/gcp.md)."""
    return on_gcs(boot.store_url) and getattr(boot, "role", "") != "controller"


def on_gcs(store_url: str) -> bool:
    return store_url.startswith("gs://")


def _session(provider: Any) -> Any:
    from google.auth.transport.requests import AuthorizedSession

    provider.project  # noqa: B018 -- resolves the default credentials when none were given
    credentials = getattr(provider, "_credentials", None)
    if credentials is None:
        import google.auth

        credentials, _ = google.auth.default()
    return AuthorizedSession(credentials)


def _bases(provider: Any) -> tuple[str, str]:
    """(IAM base URL, Cloud Storage base URL): the provider's test endpoint serves both."""
    endpoint = getattr(provider, "endpoint", None)
    return (endpoint or IAM_ENDPOINT, endpoint or STORAGE_ENDPOINT)


def _fail(what: str, response: Any, permission: str) -> Exception:
    from spotrun.clouds.base import AuthError, BadRequest, ProviderError, Throttled

    status = response.status_code
    try:
        message = response.json().get("error", {}).get("message", "")
    except ValueError:
        message = response.text[:200]
    text = f"{what}: HTTP {status} {message}".strip()
    if status in (401, 403):
        return AuthError(f"{text} (spotrun's credential needs {permission}; {DOC})", code="identity")
    if status == 429:
        return Throttled(text, code="429")
    if 400 <= status < 500:
        return BadRequest(text, code=str(status))
    return ProviderError(text, code=str(status))


def _request(session: Any, method: str, url: str, what: str, permission: str, **kwargs: Any) -> Any:
    from google.auth import exceptions as authexc

    from spotrun.clouds.base import AuthError, ProviderError

    try:
        return session.request(method, url, timeout=30, **kwargs)
    except authexc.TransportError as e:
        raise ProviderError(f"{what}: {type(e).__name__}: {e}", code="network") from e
    except authexc.GoogleAuthError as e:  # a 401 made it refresh credentials that cannot be refreshed
        raise AuthError(f"{what}: Google credentials rejected: {e}", code="credentials") from e
    except OSError as e:  # requests' connection errors
        raise ProviderError(f"{what}: {type(e).__name__}: {e}", code="network") from e


def ensure_job_account(provider: Any, boot: Any) -> str:
    """Create job `boot.job_id`'s service account (if absent) and bind it on the store bucket as
    `job_bindings` says; idempotent (a resumed job finds both in place). Returns its email."""
    session = _session(provider)
    iam, storage = _bases(provider)
    project = provider.project
    email = job_service_account(boot.job_id, project)
    body = {
        "accountId": email.split("@", 1)[0],
        "serviceAccount": {
            "displayName": f"spotrun job {boot.job_id}"[:100],
            "description": f"{DESCRIPTION_TAG}{boot.job_id} store={boot.store_url}"[:256],
        },
    }
    url = f"{iam}/v1/projects/{project}/serviceAccounts"
    r = _request(session, "POST", url, "creating the job's service account", "iam.serviceAccounts.create", json=body)
    if r.status_code not in (200, 409):  # 409 ALREADY_EXISTS: an earlier launch of this job made it
        raise _fail(f"creating service account {email}", r, "iam.serviceAccounts.create")
    bucket, _ = _split(boot.store_url)
    member = f"serviceAccount:{email}"
    bindings = job_bindings(boot.store_url, boot.job_id, member)
    _update_bucket_policy(session, storage, bucket, member, bindings, sleep=provider.clock.sleep)
    return email


def _update_bucket_policy(
    session: Any, base: str, bucket: str, member: str, bindings: list[Binding], *, sleep: Any = None
) -> None:
    """Replace `member`'s bindings on the bucket by `bindings` (read-modify-write on the etag).
    A new account may not be visible to Cloud Storage for a few seconds (IAM is eventually
    consistent): "does not exist" is retried with `sleep`, as a stale etag is."""
    url = f"{base}/storage/v1/b/{bucket}/iam"
    for attempt in range(ETAG_TRIES):
        r = _request(session, "GET", url, "reading the bucket's IAM policy", "storage.buckets.getIamPolicy",
                     params={"optionsRequestedPolicyVersion": "3"})  # fmt: skip
        if r.status_code != 200:
            raise _fail(f"reading gs://{bucket}'s IAM policy", r, "storage.buckets.getIamPolicy")
        policy = r.json()
        kept = []
        for b in policy.get("bindings", []):
            members = [m for m in b.get("members", []) if m != member]
            if members:
                kept.append({**b, "members": members})
        for b in bindings:
            kept.append({"role": b.role, "members": [member], "condition": b.condition(bucket)})
        new = {"bindings": kept, "version": 3, "etag": policy.get("etag", "")}
        r = _request(session, "PUT", url, "writing the bucket's IAM policy", "storage.buckets.setIamPolicy", json=new)
        if r.status_code == 200:
            return
        if r.status_code == 400 and "does not exist" in r.text and sleep is not None:
            if attempt + 1 == ETAG_TRIES:  # still not visible: a passing fault, the launch is retried
                from spotrun.clouds.base import Throttled

                raise Throttled(f"gs://{bucket}: the job's new service account is not visible yet", code="400")
            sleep(2.0 * (attempt + 1))  # the account was created a moment ago
            continue
        if r.status_code not in (409, 412):  # 412: the etag is stale (someone else wrote): read again
            raise _fail(f"writing gs://{bucket}'s IAM policy", r, "storage.buckets.setIamPolicy")
    from spotrun.clouds.base import Throttled

    raise Throttled(f"gs://{bucket}'s IAM policy kept changing under us ({ETAG_TRIES} tries)", code="412")


def release_job_account(provider: Any, job_id: str) -> bool:
    """Remove job `job_id`'s account from the bucket policy, then delete it (idempotent; the
    store is read from the account's description). True when there was one to delete."""
    session = _session(provider)
    iam, storage = _bases(provider)
    email = job_service_account(job_id, provider.project)
    url = f"{iam}/v1/projects/{provider.project}/serviceAccounts/{email}"
    r = _request(session, "GET", url, "reading the job's service account", "iam.serviceAccounts.get")
    if r.status_code == 404:
        return False
    if r.status_code != 200:
        raise _fail(f"reading service account {email}", r, "iam.serviceAccounts.get")
    store = _described_store(r.json().get("description", ""))
    if store.startswith("gs://"):
        _update_bucket_policy(session, storage, _split(store)[0], f"serviceAccount:{email}", [])
    r = _request(session, "DELETE", url, "deleting the job's service account", "iam.serviceAccounts.delete")
    if r.status_code not in (200, 404):
        raise _fail(f"deleting service account {email}", r, "iam.serviceAccounts.delete")
    return True


def _described_store(description: str) -> str:
    for word in description.split():
        if word.startswith("store="):
            return word[len("store=") :]
    return ""


def leftover_accounts(provider: Any) -> dict[str, str]:
    """Per-job accounts still in the project: job id -> email (a crashed controller leaves them;
    `spotrun gc` releases those whose job has ended)."""
    session = _session(provider)
    iam, _ = _bases(provider)
    url = f"{iam}/v1/projects/{provider.project}/serviceAccounts"
    found: dict[str, str] = {}
    token = ""
    while True:
        params = {"pageToken": token} if token else {}
        r = _request(session, "GET", url, "listing service accounts", "iam.serviceAccounts.list", params=params)
        if r.status_code != 200:
            raise _fail("listing service accounts", r, "iam.serviceAccounts.list")
        page = r.json()
        for account in page.get("accounts", []):
            words = account.get("description", "").split()
            if words and words[0].startswith(DESCRIPTION_TAG):
                found[words[0][len(DESCRIPTION_TAG) :]] = account.get("email", "")
        token = page.get("nextPageToken", "")
        if not token:
            return found
