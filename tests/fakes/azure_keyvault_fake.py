"""A local fake of Azure Key Vault's secrets (data plane, api-version 7.x), of the two ARM calls
a secret grant needs, and of IMDS's managed-identity token endpoint.

The real `azure-keyvault-secrets` `SecretClient` talks to it (`vault_url=fake.url`), and so does
the Agent's plain-HTTP reader. Strict where the service is:

* Key Vault's challenge: a request without a bearer token gets 401 with `WWW-Authenticate`
  (the SDK then asks its credential for a `https://vault.azure.net` token); an unknown token 401.
* `admins` (the controller's token) may do everything; any other principal may only `GET` a
  secret when a role assignment of *Key Vault Secrets User* for its principal id covers the
  secret (scope = the vault or `<vault>/secrets/<name>`); else 403 `ForbiddenByRbac`.
* `PUT /secrets/<name>`: name `[0-9a-zA-Z-]{1,127}`, `value` required (400); each PUT is a new
  version; `GET /secrets/<name>/<version>`, `/versions`; a missing one 404 `SecretNotFound`.
  `DELETE` soft-deletes (`/deletedsecrets/<name>`, which a new PUT of the name conflicts with,
  409); `DELETE /deletedsecrets/<name>` purges.

ARM (attached to the fake ARM server with `attach_arm`, guarded by its token): `GET` of a
user-assigned identity (its `principalId`), `PUT`/`GET`/`DELETE` role assignments at any scope;
a PUT with an unknown principal is 400 `PrincipalNotFound`, a second assignment of the same role,
principal and scope under another name 409 `RoleAssignmentExists`.

IMDS: `GET /metadata/identity/oauth2/token` needs `Metadata: true` and `resource`, and hands out
the token of the identity named by `msi_res_id` (400 if it is not one of `identities`).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.rest_fake import Request, Response, RestFake

CONTROLLER_TOKEN = "keyvault-controller-token"
SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"
VAULT_NAME = "spotrun-kv"
_NAME = re.compile(r"[0-9a-zA-Z-]{1,127}")


def _error(status: int, code: str, message: str, inner: str | None = None) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return Response(status, {"error": error})


class FakeKeyVault(RestFake):
    def __init__(self, *, subscription: str, resource_group: str, vault_name: str = VAULT_NAME) -> None:
        super().__init__()
        group = f"/subscriptions/{subscription}/resourceGroups/{resource_group}"
        self.vault_id = f"{group}/providers/Microsoft.KeyVault/vaults/{vault_name}"
        self.identities: dict[str, str] = {}  # identity resource id (lower) -> principal id
        self._arm: Any = None  # the attached FakeARM: the per-job identities it made exist too
        self.tokens: dict[str, str] = {CONTROLLER_TOKEN: "controller"}  # token -> principal id
        self.admins = {"controller"}
        self.secrets: dict[str, list[dict[str, Any]]] = {}  # name -> versions (newest last)
        self.deleted: dict[str, list[dict[str, Any]]] = {}
        self.assignments: dict[str, dict[str, Any]] = {}  # assignment id (lower) -> body
        self.arm_requests: list[Request] = []
        r = self.route
        r("PUT", r"/secrets/(?P<name>[^/]+)", self._put)
        r("GET", r"/secrets/(?P<name>[^/]+)/versions", self._versions)
        r("GET", r"/secrets/(?P<name>[^/]+)(?:/(?P<version>[^/]*))?", self._get)
        r("DELETE", r"/secrets/(?P<name>[^/]+)", self._delete)
        r("GET", r"/deletedsecrets/(?P<name>[^/]+)", self._get_deleted)
        r("DELETE", r"/deletedsecrets/(?P<name>[^/]+)", self._purge)
        r("GET", r"/metadata/identity/oauth2/token", self._imds_token)

    # ------------------------------------------------------------------ TLS

    def start_tls(self, folder: Path) -> FakeKeyVault:
        """Serve over HTTPS with a self-signed certificate for 127.0.0.1 (Key Vault's client sends
        a bearer token over TLS only). `ca_file` is what clients must trust (SSL_CERT_FILE,
        REQUESTS_CA_BUNDLE)."""
        import ssl
        import subprocess

        cert, key = folder / "kv-cert.pem", folder / "kv-key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.ca_file = str(cert)
        self.start()
        assert self._server is not None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        return self

    @property
    def url(self) -> str:
        base = super().url
        return base.replace("http://", "https://") if getattr(self, "ca_file", None) else base

    def trust_env(self) -> dict[str, str]:
        """What a process needs to trust this server: Python's ssl module and requests read these."""
        return {"SSL_CERT_FILE": self.ca_file, "REQUESTS_CA_BUNDLE": self.ca_file}

    def add_identity(self, resource_id: str) -> str:
        """A user-assigned identity the VMs may run as; returns its token (what IMDS hands out)."""
        principal = str(uuid.uuid5(uuid.NAMESPACE_URL, resource_id.lower()))
        self.identities[resource_id.lower()] = principal
        token = f"imds-token-{principal}"
        self.tokens[token] = principal
        return token

    def vm_env(self) -> dict[str, str]:
        return {"SPOTRUN_AZURE_IMDS": self.url}

    def controller_env(self) -> dict[str, str]:
        return {"SPOTRUN_AZURE_KEY_VAULT": self.vault_id, "SPOTRUN_AZURE_KEY_VAULT_URL": self.url}

    # ------------------------------------------------------------------ data plane

    def _caller(self, req: Request) -> str | Response:
        auth = req.header("authorization")
        if not auth.startswith("Bearer "):
            return Response(
                401,
                {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer token."}},
                headers={
                    "WWW-Authenticate": 'Bearer authorization="https://login.microsoftonline.com/tenant-1", '
                    'resource="https://vault.azure.net"'
                },
            )
        principal = self.tokens.get(auth.removeprefix("Bearer "))
        if principal is None:
            return _error(401, "Unauthorized", "AKV10032: Invalid issuer.")
        if "api-version" not in req.query:
            return _error(400, "BadParameter", "The 'api-version' query parameter is missing.")
        return principal

    def _admin(self, req: Request) -> Response | None:
        caller = self._caller(req)
        if isinstance(caller, Response):
            return caller
        if caller not in self.admins:
            return _error(403, "Forbidden", f"Caller {caller} is not authorized", "ForbiddenByRbac")
        return None

    def _bundle(self, name: str, version: dict[str, Any], *, value: bool) -> dict[str, Any]:
        out = {
            "id": f"{self.url}/secrets/{name}/{version['version']}",
            "attributes": {"enabled": True, "created": version["created"], "updated": version["created"]},
            "tags": version.get("tags") or {},
        }
        if value:
            out["value"] = version["value"]
        return out

    def _put(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        name = req.params["name"]
        body = req.body if isinstance(req.body, dict) else {}
        if not _NAME.fullmatch(name):
            return _error(400, "BadParameter", f"The secret name {name!r} is invalid.")
        if not isinstance(body.get("value"), str):
            return _error(400, "BadParameter", "Property 'value' is required.")
        with self.lock:
            if name in self.deleted:
                return _error(409, "Conflict", f"Secret {name} is currently in a deleted but recoverable state.")
            version = {"version": uuid.uuid4().hex, "value": body["value"], "tags": body.get("tags"), "created": _now()}
            self.secrets.setdefault(name, []).append(version)
        return Response(200, self._bundle(name, version, value=True))

    def _get(self, req: Request) -> Response:
        caller = self._caller(req)
        if isinstance(caller, Response):
            return caller
        name, wanted = req.params["name"], req.params.get("version") or ""
        if caller not in self.admins and not self._granted(caller, name):
            return _error(403, "Forbidden", f"Caller {caller} may not get secret {name}", "ForbiddenByRbac")
        with self.lock:
            versions = self.secrets.get(name) or []
            chosen = versions[-1:] if not wanted else [v for v in versions if v["version"] == wanted]
            if not chosen:
                return _error(404, "SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault.")
            return Response(200, self._bundle(name, chosen[0], value=True))

    def _versions(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        name = req.params["name"]
        with self.lock:
            versions = self.secrets.get(name)
            if not versions:
                return _error(404, "SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault.")
            return Response(200, {"value": [self._bundle(name, v, value=False) for v in versions], "nextLink": None})

    def _delete(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        name = req.params["name"]
        with self.lock:
            versions = self.secrets.pop(name, None)
            if versions is None:
                return _error(404, "SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault.")
            self.deleted[name] = versions
        return Response(200, self._deleted_bundle(name, versions[-1]))

    def _deleted_bundle(self, name: str, version: dict[str, Any]) -> dict[str, Any]:
        return {
            **self._bundle(name, version, value=False),
            "recoveryId": f"{self.url}/deletedsecrets/{name}",
            "deletedDate": int(time.time()),
            "scheduledPurgeDate": int(time.time()) + 7 * 86400,
        }

    def _get_deleted(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        name = req.params["name"]
        with self.lock:
            if name not in self.deleted:
                return _error(404, "SecretNotFound", f"Deleted Secret not found: {name}")
            return Response(200, self._deleted_bundle(name, self.deleted[name][-1]))

    def _purge(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        with self.lock:
            if self.deleted.pop(req.params["name"], None) is None:
                return _error(404, "SecretNotFound", f"Deleted Secret not found: {req.params['name']}")
        return Response(204)

    def _granted(self, principal: str, name: str) -> bool:
        scopes = {self.vault_id.lower(), f"{self.vault_id}/secrets/{name}".lower()}
        with self.lock:
            return any(
                a["properties"]["principalId"] == principal
                and a["properties"]["roleDefinitionId"].lower().endswith(f"/roledefinitions/{SECRETS_USER}")
                and a["properties"]["scope"].lower() in scopes
                for a in self.assignments.values()
            )

    # ------------------------------------------------------------------ IMDS

    def _imds_token(self, req: Request) -> Response:
        if req.header("metadata") != "true":
            return _error(400, "invalid_request", "Required metadata header not specified")
        if not req.query.get("resource"):
            return _error(400, "invalid_request", "Required audience parameter not specified")
        principal = self._principals().get(req.query.get("msi_res_id", "").lower())
        if principal is None:
            return _error(400, "invalid_request", "Identity not found")
        token = f"imds-token-{principal}"
        self.tokens[token] = principal
        return Response(200, {"access_token": token, "expires_in": "86399", "resource": req.query["resource"]})

    # ------------------------------------------------------------------ ARM

    def _principals(self) -> dict[str, str]:
        """Every identity Entra ID knows: ours, and the per-job ones the attached ARM made."""
        made = getattr(self._arm, "managed_identities", {}) or {}
        return {**self.identities, **{k: v["properties"]["principalId"] for k, v in dict(made).items()}}

    def attach_arm(self, arm: Any) -> None:
        """Serve the identity and role-assignment calls on the fake ARM server `arm`."""
        self._arm = arm
        assignment = r"(?P<scope>/subscriptions/.+)/providers/Microsoft\.Authorization/roleAssignments/(?P<id>[^/]+)"
        group = r"/subscriptions/[^/]+/resourceGroups/[^/]+"
        identity = group + r"/providers/Microsoft\.ManagedIdentity/userAssignedIdentities/[^/]+"

        def guarded(handler: Any) -> Any:
            def serve(req: Request) -> Response:
                with self.lock:
                    self.arm_requests.append(req)
                if req.header("authorization") != f"Bearer {arm.token}":
                    return _error(401, "InvalidAuthenticationToken", "The access token is invalid.")
                if "api-version" not in req.query:
                    return _error(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
                return handler(req)

            return serve

        serve_identity = guarded(self._identity)
        arm.route("GET", identity, serve_identity)

        def known(rid: str, req: Request | None) -> Response | None:
            """FakeARM answers identity GETs (its own route comes first): it asks here about ours."""
            if rid.lower() not in self.identities:
                return None
            return serve_identity(req) if req is not None else Response(200)

        arm.identity_sources.append(known)
        arm.route("PUT", assignment, guarded(self._assign))
        arm.route("GET", assignment, guarded(self._assignment))
        arm.route("DELETE", assignment, guarded(self._unassign))

    def _identity(self, req: Request) -> Response:
        principal = self.identities.get(req.path.lower())
        if principal is None:
            return _error(404, "ResourceNotFound", f"The Resource '{req.path}' was not found.")
        return Response(200, {"id": req.path, "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                              "properties": {"principalId": principal, "clientId": str(uuid.uuid4())}})  # fmt: skip

    def _assign(self, req: Request) -> Response:
        props = (req.body or {}).get("properties") if isinstance(req.body, dict) else None
        if not isinstance(props, dict) or not props.get("roleDefinitionId") or not props.get("principalId"):
            return _error(400, "InvalidRoleAssignmentRequest", "roleDefinitionId and principalId are required.")
        if props["principalId"] not in self._principals().values():
            return _error(
                400, "PrincipalNotFound", f"Principal {props['principalId']} does not exist in the directory."
            )
        key, scope = req.path.lower(), req.params["scope"]
        with self.lock:
            for other_key, other in self.assignments.items():
                same = (other["properties"]["principalId"], other["properties"]["roleDefinitionId"].lower())
                if (
                    other_key != key
                    and other["properties"]["scope"].lower() == scope.lower()
                    and same == (props["principalId"], props["roleDefinitionId"].lower())
                ):
                    return _error(409, "RoleAssignmentExists", "The role assignment already exists.")
            body = {"id": req.path, "name": req.params["id"], "properties": {**props, "scope": scope}}
            self.assignments[key] = body
        return Response(201, body)

    def _assignment(self, req: Request) -> Response:
        with self.lock:
            body = self.assignments.get(req.path.lower())
        return (
            Response(200, body) if body else _error(404, "RoleAssignmentNotFound", "The role assignment was not found.")
        )

    def _unassign(self, req: Request) -> Response:
        with self.lock:
            body = self.assignments.pop(req.path.lower(), None)
        return Response(200, body) if body else Response(204)

    # ------------------------------------------------------------------ test side

    def values(self) -> list[str]:
        with self.lock:
            return [v["value"] for vs in [*self.secrets.values(), *self.deleted.values()] for v in vs]


def _now() -> int:
    return int(time.time())


class ControllerToken:
    """The controller's Azure credential as the SDKs see it: one static token for every scope."""

    def __init__(self, token: str = CONTROLLER_TOKEN) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture
def keyvault(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKeyVault]:
    """The fake vault over HTTPS; this process trusts its certificate."""
    import shutil

    from tests.fakes.azure_server import RESOURCE_GROUP, SUBSCRIPTION

    if shutil.which("openssl") is None:
        pytest.skip("the fake Key Vault needs `openssl` to make its TLS certificate (apt-get install openssl)")
    fake = FakeKeyVault(subscription=SUBSCRIPTION, resource_group=RESOURCE_GROUP)
    fake.start_tls(tmp_path_factory.mktemp("keyvault-tls"))
    for name, value in fake.trust_env().items():
        monkeypatch.setenv(name, value)
    try:
        yield fake
    finally:
        fake.stop()
