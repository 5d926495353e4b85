"""IAM service accounts and Cloud Storage bucket IAM policies, served by the GCE fake
(`install(fake)` from FakeGCE's routes) for spotrun's per-job identity (clouds/gcp/identity.py).

Modelled on the real APIs where spotrun depends on them:

* `POST /v1/projects/<p>/serviceAccounts` creates an account; `accountId` must be 6-30 characters,
  `[a-z]([-a-z0-9]*[a-z0-9])` (400 INVALID_ARGUMENT); an existing one answers 409 ALREADY_EXISTS.
  `GET` lists them (with their descriptions), `DELETE .../<email>` deletes (404 when absent). A new
  account joins the fake's `service_accounts`, so a VM may then run as it.
* `GET /storage/v1/b/<bucket>/iam` answers the policy with its `etag`; a policy holding conditions
  is refused (400) unless `optionsRequestedPolicyVersion=3` is asked, as Cloud Storage does.
* `PUT /storage/v1/b/<bucket>/iam`: a stale `etag` is refused with 412 conditionNotMet; a condition
  needs `version: 3`; a member `serviceAccount:<email>` that does not exist, an unknown role, or a
  condition expression that is not `resource.name.startsWith("...")` clauses joined by `||` is
  refused with 400 invalid.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from tests.fakes.rest_fake import Request, Response

ACCOUNT_ID = re.compile(r"^[a-z](?:[-a-z0-9]{4,28}[a-z0-9])$")
ROLES = ("roles/storage.objectUser", "roles/storage.objectViewer", "roles/storage.objectAdmin")
CLAUSE = re.compile(
    r'^resource\.name\.startsWith\("projects/_/buckets/(?P<bucket>[^/"]+)/objects/(?P<prefix>[^"]*)"\)$'
)


def _error(status: int, reason: str, message: str, state: str) -> Response:
    errors = [{"domain": "global", "reason": reason, "message": message}]
    return Response(status, {"error": {"code": status, "message": message, "status": state, "errors": errors}})


def condition_prefixes(bucket: str, expression: str) -> list[str] | None:
    """The object-name prefixes an expression allows, or None when it is not one the fake parses."""
    prefixes = []
    for clause in expression.split("||"):
        m = CLAUSE.match(clause.strip())
        if not m or m.group("bucket") != bucket:
            return None
        prefixes.append(m.group("prefix"))
    return prefixes


def install(fake: Any) -> None:
    fake.account_records = {}  # email -> the account resource
    fake.bucket_policies = {}  # bucket -> {"bindings": [...], "etag": str, "version": int}
    fake._policy_writes = 0

    def authorized(req: Request) -> Response | None:
        if req.header("authorization") != f"Bearer {fake.token}":
            return _error(401, "authError", "Invalid Credentials", "UNAUTHENTICATED")
        return None

    def create(req: Request) -> Response:
        denied = authorized(req)
        if denied:
            return denied
        if req.params["sa_project"] != fake.project:
            return _error(404, "notFound", f"Project {req.params['sa_project']} not found", "NOT_FOUND")
        body = req.body if isinstance(req.body, dict) else {}
        account_id = str(body.get("accountId", ""))
        if not ACCOUNT_ID.match(account_id):
            return _error(400, "badRequest", f"Invalid account id: {account_id!r}", "INVALID_ARGUMENT")
        email = f"{account_id}@{fake.project}.iam.gserviceaccount.com"
        with fake.lock:
            if email in fake.account_records:
                return _error(409, "conflict", f"Service account {account_id} already exists", "ALREADY_EXISTS")
            extra = body.get("serviceAccount") or {}
            record = {
                "name": f"projects/{fake.project}/serviceAccounts/{email}",
                "projectId": fake.project,
                "uniqueId": str(100000000000000000000 + len(fake.account_records)),
                "email": email,
                "displayName": extra.get("displayName", ""),
                "description": extra.get("description", ""),
            }
            fake.account_records[email] = record
            fake.service_accounts.add(email)
        return Response(200, record)

    def listing(req: Request) -> Response:
        denied = authorized(req)
        if denied:
            return denied
        with fake.lock:
            return Response(200, {"accounts": list(fake.account_records.values())})

    def delete(req: Request) -> Response:
        denied = authorized(req)
        if denied:
            return denied
        email = req.params["email"]
        with fake.lock:
            if fake.account_records.pop(email, None) is None:
                return _error(404, "notFound", f"Unknown service account {email}", "NOT_FOUND")
            fake.service_accounts.discard(email)
        return Response(200, {})

    def get_policy(req: Request) -> Response:
        denied = authorized(req)
        if denied:
            return denied
        with fake.lock:
            policy = fake.bucket_policies.setdefault(req.params["bucket"], _empty())
            conditional = any("condition" in b for b in policy["bindings"])
            if conditional and req.query.get("optionsRequestedPolicyVersion") != "3":
                return _error(400, "invalid", "The policy has conditions: request policy version 3", "INVALID_ARGUMENT")
            return Response(200, {"kind": "storage#policy", "resourceId": f"projects/_/buckets/{req.params['bucket']}",
                                  **policy})  # fmt: skip

    def set_policy(req: Request) -> Response:
        denied = authorized(req)
        if denied:
            return denied
        bucket = req.params["bucket"]
        body = req.body if isinstance(req.body, dict) else {}
        with fake.lock:
            current = fake.bucket_policies.setdefault(bucket, _empty())
            if body.get("etag") and body["etag"] != current["etag"]:
                return _error(412, "conditionNotMet", "Precondition Failed", "FAILED_PRECONDITION")
            bindings = body.get("bindings", [])
            for b in bindings:
                bad = _binding_error(fake, bucket, b, body.get("version", 1))
                if bad:
                    return _error(400, "invalid", bad, "INVALID_ARGUMENT")
            fake._policy_writes += 1
            etag = base64.b64encode(f"policy-{fake._policy_writes}".encode()).decode()
            fake.bucket_policies[bucket] = {"bindings": bindings, "etag": etag, "version": body.get("version", 1)}
            return Response(200, {"kind": "storage#policy", **fake.bucket_policies[bucket]})

    sa = r"/v1/projects/(?P<sa_project>[^/]+)/serviceAccounts"
    fake.route("POST", sa, create)
    fake.route("GET", sa, listing)
    fake.route("DELETE", sa + r"/(?P<email>[^/]+)", delete)
    fake.route("GET", r"/storage/v1/b/(?P<bucket>[^/]+)/iam", get_policy)
    fake.route("PUT", r"/storage/v1/b/(?P<bucket>[^/]+)/iam", set_policy)


def reset(fake: Any) -> None:
    fake.account_records.clear()
    fake.bucket_policies.clear()


def _empty() -> dict[str, Any]:
    return {"bindings": [], "etag": "CAE=", "version": 1}


def _binding_error(fake: Any, bucket: str, b: dict[str, Any], version: int) -> str | None:
    if b.get("role") not in ROLES:
        return f"Role {b.get('role')} is not supported for this resource."
    for member in b.get("members", []):
        kind, _, who = member.partition(":")
        if kind == "serviceAccount" and who not in fake.service_accounts:
            return f"Service account {who} does not exist."
    condition = b.get("condition")
    if condition is not None:
        if version != 3:
            return "IAM conditions require policy version 3."
        if condition_prefixes(bucket, str(condition.get("expression", ""))) is None:
            return f"Condition expression is invalid: {condition.get('expression')!r}"
    return None
