"""Google Secret Manager as the job's secret store: the real google-cloud-secret-manager client
(REST) against tests/fakes/gcp_secret_fake.py, and the VM's plain-HTTP reader with a metadata
token. The fake refuses what the service refuses: unknown tokens, callers not bound on the secret."""

from __future__ import annotations

import base64
import json

import pytest

from spotrun.clouds.gcp.secrets import ACCESSOR_ROLE, GCPSecrets
from spotrun.clouds.secrets import SecretsError
from tests.fakes.gcp_secret_fake import (
    PROJECT,
    VM_SERVICE_ACCOUNT,
    FakeSecretManager,
    controller_credentials,
    secret_manager,  # noqa: F401  (fixture)
)

VALUE = "hf_0123456789-gcp-not-in-any-log"


def store(fake: FakeSecretManager, *, service_account: str | None = VM_SERVICE_ACCOUNT, token: str | None = None):
    creds = controller_credentials(token) if token else controller_credentials()
    return GCPSecrets(PROJECT, service_account=service_account, credentials=creds, endpoint=fake.url)


def test_put_grants_the_vm_account_only_then_the_vm_reads_it(
    secret_manager: FakeSecretManager,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in secret_manager.env().items():
        monkeypatch.setenv(k, v)
    s = store(secret_manager)
    assert s.find("job-1") is None
    ref = s.put("job-1", {"HF_TOKEN": VALUE})
    assert ref == {"cloud": "gcp", "name": f"projects/{PROJECT}/secrets/spotrun-job-1"}
    entry = secret_manager.secrets[ref["name"]]
    assert entry["secret"]["labels"] == {"spotrun-job": "job-1"}
    assert entry["policy"]["bindings"] == [{"role": ACCESSOR_ROLE, "members": [f"serviceAccount:{VM_SERVICE_ACCOUNT}"]}]
    assert GCPSecrets.fetch(ref) == {"HF_TOKEN": VALUE}  # metadata token -> versions/latest:access

    s.put("job-1", {"HF_TOKEN": "rotated"})  # a second launch: version 2 is the latest
    assert [v["name"].rsplit("/", 1)[-1] for v in entry["versions"]] == ["1", "2"]
    assert GCPSecrets.fetch(ref) == {"HF_TOKEN": "rotated"}
    assert s.find("job-1") == ref
    entry["policy"] = {"bindings": []}  # a resume reusing the stored secret grants the VM account again
    assert s.grant("job-1") == ref and GCPSecrets.fetch(ref) == {"HF_TOKEN": "rotated"}

    assert s.delete("job-1") is True
    assert s.delete("job-1") is False
    assert secret_manager.secrets == {}
    with pytest.raises(SecretsError, match=r"HTTP 404"):
        GCPSecrets.fetch(ref, tries=1)


def test_the_fake_refuses_what_the_service_refuses(
    secret_manager: FakeSecretManager,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in secret_manager.env().items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SecretsError, match="credentials rejected") as bad:
        store(secret_manager, token="nobody").put("job-1", {"A": "b"})
    assert bad.value.permanent
    # a VM whose account is not bound on the secret: 403
    ref = store(secret_manager, service_account="other@spotrun-test.iam.gserviceaccount.com").put("job-2", {"A": "b"})
    with pytest.raises(SecretsError, match=r"HTTP 403"):
        GCPSecrets.fetch(ref, tries=1)
    # the VM account may read, but not write or delete
    secret_manager.tokens["vm-admin-try"] = f"serviceAccount:{VM_SERVICE_ACCOUNT}"
    with pytest.raises(SecretsError, match="Permission denied"):
        store(secret_manager, token="vm-admin-try").put("job-3", {"A": "b"})
    # no service account on the VMs: nobody could read it, so nothing is stored
    with pytest.raises(SecretsError, match="needs gcp.service_account") as none:
        store(secret_manager, service_account=None).put("job-4", {"A": "b"})
    assert none.value.permanent
    # the REST client really sent base64 JSON to the fake
    sent = secret_manager.requests_to("POST", r":addVersion$")[0].body["payload"]["data"]
    assert json.loads(base64.b64decode(sent)) == {"A": "b"}
