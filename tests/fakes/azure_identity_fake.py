"""User-assigned managed identities and role assignments on storage scopes, added to the ARM fake
(`install(arm)` from FakeARM's routes) for spotrun's per-job identity (clouds/azure/identity.py).

Modelled on ARM where spotrun depends on it:

* `Microsoft.ManagedIdentity/userAssignedIdentities` PUT (needs a location; the name 3-128
  characters of letters, digits, '-' and '_'), GET, DELETE (204 when absent) and list; a created
  identity gets a `principalId` and joins the fake's `identities` (a VM may then use it).
* `Microsoft.Authorization/roleAssignments` PUT/GET/DELETE on a `Microsoft.Storage` scope: the
  assignment name must be a GUID; a principal that does not exist is refused with 400
  PrincipalNotFound; an unknown role definition with 400 RoleDefinitionDoesNotExist; a condition
  without `conditionVersion` "2.0", or one that is not ActionMatches / `StringStartsWith` clauses
  joined by AND / OR with balanced parentheses, with 400 InvalidConditionExpression; the same
  principal, role and scope under another name with 409 RoleAssignmentExists.
  (Role assignments on Key Vault scopes are tests/fakes/azure_keyvault_fake.py's.)
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from tests.fakes.rest_fake import Request, Response

ROLE_DEFINITIONS = {
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
    "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": "Storage Blob Data Reader",
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{2,127}$")
ACTION = re.compile(r"ActionMatches\{'Microsoft\.Storage/storageAccounts/blobServices/containers/blobs/[a-z/]+'\}")
PATH = re.compile(
    r"@Resource\[Microsoft\.Storage/storageAccounts/blobServices/containers/blobs:path\]"
    r" StringStartsWith '(?P<p>[^']*)'"
)
G = r"/subscriptions/(?P<sub>[^/]+)/resource[gG]roups/(?P<rg>[^/]+)"
IDENTITIES = G + r"/providers/Microsoft\.ManagedIdentity/userAssignedIdentities"
ASSIGNMENT = (
    r"(?P<scope>/subscriptions/[^/]+/resource[gG]roups/[^/]+/providers/Microsoft\.Storage/[^?]+?)"
    r"/providers/Microsoft\.Authorization/roleAssignments/(?P<id>[^/]+)"
)


def _error(status: int, code: str, message: str) -> Response:
    return Response(status, {"error": {"code": code, "message": message}})


def principal_of(rid: str) -> str:
    """The principal id ARM gives an identity (the base fake's formula: the same id, the same one)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, rid))


def condition_error(condition: str) -> str | None:
    """None when the expression parses as the ABAC grammar spotrun writes, else why not."""
    depth = 0
    for ch in condition:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return "unbalanced parentheses"
    if depth:
        return "unbalanced parentheses"
    rest = PATH.sub(" ", ACTION.sub(" ", condition))
    rest = re.sub(r"\b(AND|OR)\b|[()!]", " ", rest)
    if rest.strip() or not PATH.search(condition):
        return f"unexpected {rest.strip()[:40]!r}" if rest.strip() else "no blob path test"
    return None


def condition_prefixes(condition: str) -> list[str]:
    return [m.group("p") for m in PATH.finditer(condition)]


def install(arm: Any) -> None:
    arm.managed_identities = {}  # lower-case id -> resource
    arm.storage_assignments = {}  # lower-case path -> assignment

    def principals() -> set[str]:
        created = {r["properties"]["principalId"] for r in arm.managed_identities.values()}
        base = {
            principal_of(f"/subscriptions/{arm.subscription}/resourceGroups/{g}/providers/"
                         f"Microsoft.ManagedIdentity/userAssignedIdentities/{n}")
            for g in arm.resource_groups for n in arm.identities
        }  # fmt: skip
        return created | base

    def put_identity(req: Request) -> Response:
        denied = arm._guard(req)
        if denied:
            return denied
        name, body = req.params["name"], req.body if isinstance(req.body, dict) else {}
        if not NAME.match(name):
            return _error(400, "InvalidResourceName", f"Resource name {name} is invalid.")
        if not body.get("location"):
            return _error(400, "LocationRequired", "The location property is required for this definition.")
        rid = req.path
        with arm.lock:
            existed = rid.lower() in arm.managed_identities
            principal = principal_of(rid)
            resource = {
                "id": rid,
                "name": name,
                "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                "location": body["location"],
                "tags": dict(body.get("tags") or {}),
                "properties": {"principalId": principal, "clientId": principal, "tenantId": str(uuid.UUID(int=1))},
            }
            arm.managed_identities[rid.lower()] = resource
            arm.identities.add(name)
        return Response(200 if existed else 201, resource)

    def delete_identity(req: Request) -> Response:
        denied = arm._guard(req)
        if denied:
            return denied
        with arm.lock:
            found = arm.managed_identities.pop(req.path.lower(), None)
            if found is None:
                return Response(204)
            arm.identities.discard(req.params["name"])
        return Response(200)

    def list_identities(req: Request) -> Response:
        denied = arm._guard(req)
        if denied:
            return denied
        prefix = req.path.lower() + "/"
        with arm.lock:
            return Response(200, {"value": [r for k, r in arm.managed_identities.items() if k.startswith(prefix)]})

    def put_assignment(req: Request) -> Response:
        denied = arm._guard(req)
        if denied:
            return denied
        try:
            uuid.UUID(req.params["id"])
        except ValueError:
            return _error(400, "InvalidRoleAssignmentId", f"The role assignment ID '{req.params['id']}' is not valid.")
        props = (req.body or {}).get("properties") if isinstance(req.body, dict) else None
        if not isinstance(props, dict) or not props.get("roleDefinitionId") or not props.get("principalId"):
            return _error(400, "InvalidRoleAssignmentRequest", "roleDefinitionId and principalId are required.")
        role = props["roleDefinitionId"].rsplit("/", 1)[-1].lower()
        if role not in ROLE_DEFINITIONS:
            return _error(400, "RoleDefinitionDoesNotExist", f"The specified role definition {role} does not exist.")
        with arm.lock:
            if props["principalId"] not in principals():
                return _error(
                    400, "PrincipalNotFound", f"Principal {props['principalId']} does not exist in the directory."
                )
            condition = props.get("condition")
            if condition is not None:
                if props.get("conditionVersion") != "2.0":
                    return _error(400, "InvalidConditionExpression", "conditionVersion must be 2.0.")
                why = condition_error(str(condition))
                if why:
                    return _error(400, "InvalidConditionExpression", f"The condition is invalid: {why}.")
            key, scope = req.path.lower(), req.params["scope"]
            for other_key, other in arm.storage_assignments.items():
                o = other["properties"]
                same = (o["principalId"], o["roleDefinitionId"].lower())
                wanted = (props["principalId"], props["roleDefinitionId"].lower())
                if other_key != key and o["scope"].lower() == scope.lower() and same == wanted:
                    return _error(409, "RoleAssignmentExists", "The role assignment already exists.")
            body = {"id": req.path, "name": req.params["id"], "properties": {**props, "scope": scope}}
            arm.storage_assignments[key] = body
        return Response(201, body)

    def get_assignment(req: Request) -> Response:
        denied = arm._guard(req)
        if denied:
            return denied
        with arm.lock:
            body = arm.storage_assignments.get(req.path.lower())
        return (
            Response(200, body) if body else _error(404, "RoleAssignmentNotFound", "The role assignment was not found.")
        )

    def delete_assignment(req: Request) -> Response:
        denied = arm._guard(req)
        if denied:
            return denied
        with arm.lock:
            body = arm.storage_assignments.pop(req.path.lower(), None)
        return Response(200, body) if body else Response(204)

    arm.route("PUT", IDENTITIES + r"/(?P<name>[^/]+)", put_identity)
    arm.route("DELETE", IDENTITIES + r"/(?P<name>[^/]+)", delete_identity)
    arm.route("GET", IDENTITIES, list_identities)
    arm.route("PUT", ASSIGNMENT, put_assignment)
    arm.route("GET", ASSIGNMENT, get_assignment)
    arm.route("DELETE", ASSIGNMENT, delete_assignment)


def reset(arm: Any) -> None:
    arm.managed_identities.clear()
    arm.storage_assignments.clear()
