"""Job secrets in the cloud's own secret store: what every cloud's `secrets.py` provides.

A `${VAR}` value of the spec's `env` never goes to user-data, State, the store or a log. For a
cloud VM the controller writes the job's secret values, as one JSON object, into the cloud's
secret store under a per-job name (the same for every attempt), grants read to the VM's identity
only, and hands the VM a *reference* (`SECRETS_REF_ENV` in the boot record's env: cloud, name,
region or vault; never a value). The Agent reads the values at start under the VM's own identity
and gives them to the workload through its environment. The controller deletes the secret when
the job ends.

Each cloud folder declares `SECRETS = "secrets:Class"`; the class has

* controller side (cloud SDK, imported inside the methods): `from_provider(provider)`,
  `put(job_id, values) -> ref`, `find(job_id) -> ref | None` (never reads the value),
  `delete(job_id) -> bool`;
* VM side: `fetch(ref) -> {name: value}`, a static method on Python 3.9+, standard library only
  where it can (the Agent has nothing else for sure).

This module is read on the VM too: Python 3.9 syntax, standard library only.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

SECRETS_REF_ENV = "SPOTRUN_SECRETS"  # the boot record's env: JSON {"cloud": ..., ...}, no value


class SecretsError(Exception):
    """The secret store refused or failed. `permanent`: retrying will not help (no permission, no
    identity for the VM, no store configured): the job cannot run with its secrets."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def secret_name(job_id: str, *, sep: str = "-", limit: int = 120) -> str:
    """The job's secret name: `spotrun<sep><job id>`, only [A-Za-z0-9-] (+ `sep`), at most `limit`."""
    clean = re.sub(r"[^A-Za-z0-9-]", "-", job_id)
    return f"spotrun{sep}{clean}"[:limit]


def encode_values(values: dict[str, str]) -> str:
    return json.dumps(values, sort_keys=True)


def decode_values(text: str) -> dict[str, str]:
    data: Any = json.loads(text)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise SecretsError("the job's secret is not a JSON object of strings", permanent=True)
    return data


def encode_ref(ref: dict[str, str]) -> str:
    return json.dumps(ref, sort_keys=True, separators=(",", ":"))


def decode_ref(text: str) -> dict[str, str]:
    ref: Any = json.loads(text)
    if not isinstance(ref, dict) or not isinstance(ref.get("cloud"), str):
        raise SecretsError(f"{SECRETS_REF_ENV} is not a secret reference", permanent=True)
    return ref


def get_json(url: str, headers: dict[str, str]) -> Any:
    """A JSON GET from the VM (standard library only: the Agent side runs on the image's Python)."""
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def describe_error(error: Exception) -> str:
    """An HTTP status or error class: never a response body (it could echo what was sent)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    return type(error).__name__
