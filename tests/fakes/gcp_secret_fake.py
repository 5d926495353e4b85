"""A local fake of Google Secret Manager (REST, v1) and of the metadata server's token endpoint.

The real `google-cloud-secret-manager` client (`transport="rest"`, `api_endpoint=fake.url`) and
the Agent's plain-HTTP reader talk to it. Strict where the service is:

* every API call needs `Authorization: Bearer <token>`: an unknown token gets 401
  UNAUTHENTICATED; `tokens` maps a token to its principal (`user:...`, `serviceAccount:...`).
* `admins` (the controller's principal) may do everything, as a project owner; any other
  principal may only `access` a version of a secret whose IAM policy binds it to
  `roles/secretmanager.secretAccessor` (403 PERMISSION_DENIED otherwise).
* create: secret id `[A-Za-z0-9_-]{1,255}`, `replication` required (400), a second create 409
  ALREADY_EXISTS; `addVersion` needs `payload.data` (base64); versions count 1, 2, ...; `latest`
  is the newest enabled one; a missing secret or version is 404 NOT_FOUND; delete removes the
  secret with its versions and policy.
* `GET /computeMetadata/v1/instance/service-accounts/default/token` needs `Metadata-Flavor:
  Google` (403 otherwise) and hands out the VM service account's token (`GCE_METADATA_HOST`):
  `VM_SERVICE_ACCOUNT`'s, or, where `vm_account` is set (a callable naming the account the VM
  runs as, e.g. read from the GCE fake), a token for that account.

Every request is logged (`requests`) with its body, so a test can check where a value went.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.rest_fake import Request, Response, RestFake

PROJECT = "spotrun-test"
CONTROLLER_TOKEN = "secretmanager-controller-token"
CONTROLLER = "user:controller@example.com"
VM_TOKEN = "vm-service-account-token"
VM_SERVICE_ACCOUNT = "spotrun-runner@spotrun-test.iam.gserviceaccount.com"
ACCESSOR = "roles/secretmanager.secretAccessor"
_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
P = r"/v1/projects/(?P<project>[^/]+)/secrets"


def _error(status: int, state: str, message: str) -> Response:
    return Response(status, {"error": {"code": status, "message": message, "status": state}})


class FakeSecretManager(RestFake):
    def __init__(self, *, project: str = PROJECT) -> None:
        super().__init__()
        self.project = project
        self.tokens = {CONTROLLER_TOKEN: CONTROLLER, VM_TOKEN: f"serviceAccount:{VM_SERVICE_ACCOUNT}"}
        self.admins = {CONTROLLER}
        self.vm_account: Any = None  # () -> the email the VM runs as; None: VM_SERVICE_ACCOUNT
        self.secrets: dict[str, dict[str, Any]] = {}  # full name -> {"secret", "versions", "policy"}
        r = self.route
        r("POST", P, self._create)
        r("GET", P + r"/(?P<id>[^/:]+)", self._get)
        r("DELETE", P + r"/(?P<id>[^/:]+)", self._delete)
        r("POST", P + r"/(?P<id>[^/:]+):addVersion", self._add_version)
        r("POST", P + r"/(?P<id>[^/:]+):setIamPolicy", self._set_policy)
        r("GET", P + r"/(?P<id>[^/:]+):getIamPolicy", self._get_policy)
        r("GET", P + r"/(?P<id>[^/:]+)/versions/(?P<version>[^/:]+):access", self._access)
        r("GET", r"/computeMetadata/v1/instance/service-accounts/default/token", self._metadata_token)

    @property
    def metadata_host(self) -> str:
        """What `GCE_METADATA_HOST` takes: host:port, no scheme."""
        return self.url.removeprefix("http://")

    def env(self) -> dict[str, str]:
        """The VM's view: the metadata server and the Secret Manager endpoint."""
        return {"GCE_METADATA_HOST": self.metadata_host, "SECRET_MANAGER_EMULATOR_HOST": self.url}

    # ------------------------------------------------------------------ checks

    def _caller(self, req: Request) -> str | Response:
        auth = req.header("authorization")
        principal = self.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        if principal is None:
            return _error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        if req.params.get("project") != self.project:
            return _error(403, "PERMISSION_DENIED", f"Permission denied on project {req.params.get('project')}")
        return principal

    def _admin(self, req: Request) -> Response | None:
        caller = self._caller(req)
        if isinstance(caller, Response):
            return caller
        if caller not in self.admins:
            return _error(403, "PERMISSION_DENIED", f"Permission denied for {caller}")
        return None

    def _name(self, req: Request) -> str:
        return f"projects/{self.project}/secrets/{req.params['id']}"

    def _found(self, req: Request) -> dict[str, Any] | Response:
        entry = self.secrets.get(self._name(req))
        if entry is None:
            return _error(404, "NOT_FOUND", f"Secret [{self._name(req)}] not found or has no versions.")
        return entry

    # ------------------------------------------------------------------ API

    def _create(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        secret_id = req.query.get("secretId", "")
        body = req.body if isinstance(req.body, dict) else {}
        if not _ID.fullmatch(secret_id):
            return _error(400, "INVALID_ARGUMENT", f"Invalid secret id {secret_id!r}")
        if not body.get("replication"):
            return _error(400, "INVALID_ARGUMENT", "Secret.replication is required.")
        name = f"projects/{self.project}/secrets/{secret_id}"
        with self.lock:
            if name in self.secrets:
                return _error(409, "ALREADY_EXISTS", f"Secret [{name}] already exists.")
            secret = {**body, "name": name, "createTime": _now()}
            self.secrets[name] = {"secret": secret, "versions": [], "policy": {"version": 1, "etag": "BwAA"}}
        return Response(200, secret)

    def _get(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        entry = self._found(req)
        return entry if isinstance(entry, Response) else Response(200, entry["secret"])

    def _delete(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        with self.lock:
            if self.secrets.pop(self._name(req), None) is None:
                return _error(404, "NOT_FOUND", f"Secret [{self._name(req)}] not found.")
        return Response(200, {})

    def _add_version(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        data = ((req.body or {}).get("payload") or {}).get("data") if isinstance(req.body, dict) else None
        if not data:
            return _error(400, "INVALID_ARGUMENT", "SecretPayload.data is required.")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return _error(400, "INVALID_ARGUMENT", "SecretPayload.data is not base64.")
        with self.lock:
            entry = self._found(req)
            if isinstance(entry, Response):
                return entry
            number = len(entry["versions"]) + 1
            version = {"name": f"{self._name(req)}/versions/{number}", "state": "ENABLED", "createTime": _now()}
            entry["versions"].append({**version, "_data": raw})
        return Response(200, version)

    def _set_policy(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        policy = (req.body or {}).get("policy") if isinstance(req.body, dict) else None
        if not isinstance(policy, dict):
            return _error(400, "INVALID_ARGUMENT", "policy is required.")
        for binding in policy.get("bindings", []):
            if not str(binding.get("role", "")).startswith("roles/") or not binding.get("members"):
                return _error(400, "INVALID_ARGUMENT", f"Invalid binding {binding}")
            for member in binding["members"]:
                if not re.fullmatch(r"(user|serviceAccount|group|domain):.+", member):
                    return _error(400, "INVALID_ARGUMENT", f"Invalid member {member!r}")
        with self.lock:
            entry = self._found(req)
            if isinstance(entry, Response):
                return entry
            entry["policy"] = {**policy, "version": 1, "etag": "BwAB"}
            return Response(200, entry["policy"])

    def _get_policy(self, req: Request) -> Response:
        denied = self._admin(req)
        if denied:
            return denied
        entry = self._found(req)
        return entry if isinstance(entry, Response) else Response(200, entry["policy"])

    def _access(self, req: Request) -> Response:
        caller = self._caller(req)
        if isinstance(caller, Response):
            return caller
        with self.lock:
            entry = self._found(req)
            if isinstance(entry, Response):
                return entry
            bindings = entry["policy"].get("bindings", [])
            members = {m for b in bindings if b.get("role") == ACCESSOR for m in b["members"]}
            if caller not in self.admins and caller not in members:
                denied = f"Permission 'secretmanager.versions.access' denied for {caller}"
                return _error(403, "PERMISSION_DENIED", denied)
            wanted = req.params["version"]
            enabled = [v for v in entry["versions"] if v["state"] == "ENABLED"]
            chosen = enabled[-1:] if wanted == "latest" else [v for v in enabled if v["name"].endswith(f"/{wanted}")]
            if not chosen:
                return _error(404, "NOT_FOUND", f"Secret Version [{self._name(req)}/versions/{wanted}] not found.")
            version = chosen[0]
        data = base64.b64encode(version["_data"]).decode()
        return Response(200, {"name": version["name"], "payload": {"data": data}})

    def _metadata_token(self, req: Request) -> Response:
        if req.header("metadata-flavor") != "Google":
            return Response(403, "Missing Metadata-Flavor:Google header.")
        token = VM_TOKEN
        if self.vm_account is not None:
            account = self.vm_account()
            token = f"vm-token-{account}"
            with self.lock:
                self.tokens[token] = f"serviceAccount:{account}"
        return Response(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    # ------------------------------------------------------------------ test side

    def values(self) -> list[bytes]:
        """Every version's payload the fake holds (what the store keeps)."""
        with self.lock:
            return [v["_data"] for e in self.secrets.values() for v in e["versions"]]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def controller_credentials(token: str = CONTROLLER_TOKEN) -> Any:
    from google.oauth2.credentials import Credentials

    return Credentials(token=token)


@pytest.fixture
def secret_manager() -> Iterator[FakeSecretManager]:
    fake = FakeSecretManager().start()
    try:
        yield fake  # type: ignore[misc]
    finally:
        fake.stop()
