"""Azure Key Vault as the job's secret store: the real azure-keyvault-secrets client against
tests/fakes/azure_keyvault_fake.py, the grant as an RBAC role assignment on the one secret for the
VM's managed identity (through the fake ARM), and the VM's IMDS-token reader."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from spotrun.clouds.azure.secrets import AzureSecrets
from spotrun.clouds.secrets import SecretsError
from tests.fakes.azure_keyvault_fake import ControllerToken, FakeKeyVault, keyvault  # noqa: F401  (fixture)
from tests.fakes.azure_server import ARM_TOKEN, RESOURCE_GROUP, SUBSCRIPTION, FakeARM

VALUE = "sk-azure-0123456789-not-in-any-log"
IDENTITY = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
    "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/spotrun-vm"
)


@pytest.fixture
def arm(keyvault: FakeKeyVault) -> Iterator[FakeARM]:  # noqa: F811
    server = FakeARM().start()
    keyvault.attach_arm(server)
    keyvault.tokens[ARM_TOKEN] = "controller"  # the controller's one credential, for ARM and the vault
    try:
        yield server  # type: ignore[misc]
    finally:
        server.stop()


def store(kv: FakeKeyVault, arm: FakeARM, *, identity: str | None = IDENTITY, vault: str | None = None) -> AzureSecrets:
    from tests.fakes.azure_server import StaticToken

    return AzureSecrets(
        SUBSCRIPTION,
        RESOURCE_GROUP,
        identity=identity,
        credential=StaticToken(),
        vault=vault if vault is not None else kv.vault_id,
        vault_url=kv.url,
        arm_endpoint=arm.url,
    )


def test_put_grants_the_vm_identity_on_the_one_secret_then_the_vm_reads_it(
    keyvault: FakeKeyVault,  # noqa: F811
    arm: FakeARM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keyvault.add_identity(IDENTITY)
    monkeypatch.setenv("SPOTRUN_AZURE_IMDS", keyvault.url)
    s = store(keyvault, arm)
    assert s.find("job-1") is None
    ref = s.put("job-1", {"OPENAI_API_KEY": VALUE})
    assert ref == {"cloud": "azure", "vault": keyvault.url, "name": "spotrun-job-1", "identity": IDENTITY}
    (assignment,) = keyvault.assignments.values()
    assert assignment["properties"]["scope"] == f"{keyvault.vault_id}/secrets/spotrun-job-1"
    assert assignment["properties"]["roleDefinitionId"].endswith("4633458b-17de-408a-b874-0445c86b69e6")
    assert AzureSecrets.fetch(ref) == {"OPENAI_API_KEY": VALUE}  # IMDS token -> GET secret

    s.put("job-1", {"OPENAI_API_KEY": "rotated"})  # a second launch: a new version, the same grant
    assert len(keyvault.secrets["spotrun-job-1"]) == 2 and len(keyvault.assignments) == 1
    assert AzureSecrets.fetch(ref) == {"OPENAI_API_KEY": "rotated"}
    assert s.find("job-1") == ref
    keyvault.assignments.clear()  # a resume reusing the stored secret grants the VM identity again
    assert s.grant("job-1") == ref and len(keyvault.assignments) == 1

    assert s.delete("job-1") is True
    assert keyvault.secrets == {} and keyvault.deleted == {} and keyvault.assignments == {}  # purged, ungranted
    assert s.delete("job-1") is False
    with pytest.raises(SecretsError, match="HTTP 403"):  # no grant left: the VM is refused
        AzureSecrets.fetch(ref, tries=1)


def test_the_fake_refuses_what_the_service_refuses(
    keyvault: FakeKeyVault,  # noqa: F811
    arm: FakeARM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = IDENTITY.replace("spotrun-vm", "someone-else")
    keyvault.add_identity(IDENTITY)
    keyvault.add_identity(other)
    monkeypatch.setenv("SPOTRUN_AZURE_IMDS", keyvault.url)
    ref = store(keyvault, arm).put("job-1", {"A": "b"})
    with pytest.raises(SecretsError, match="HTTP 403"):  # another identity, not granted on this secret
        AzureSecrets.fetch({**ref, "identity": other}, tries=1)
    with pytest.raises(SecretsError, match="HTTP 400"):  # IMDS: not an identity of this VM
        AzureSecrets.fetch({**ref, "identity": IDENTITY + "x"}, tries=1)
    unknown = IDENTITY.replace("spotrun-vm", "not-there")
    with pytest.raises(SecretsError, match="HTTP 404") as missing:
        store(keyvault, arm, identity=unknown).put("job-2", {"A": "b"})
    assert missing.value.permanent  # a wrong identity is the job's configuration, not a passing fault
    with pytest.raises(SecretsError, match="needs azure.identity") as no_identity:
        store(keyvault, arm, identity=None).put("job-3", {"A": "b"})
    assert no_identity.value.permanent
    with pytest.raises(SecretsError, match="needs a Key Vault"):
        store(keyvault, arm, vault="").put("job-3", {"A": "b"})
    s = store(keyvault, arm)
    s._credential = ControllerToken("wrong-token")
    with pytest.raises(SecretsError) as refused:
        s.put("job-4", {"A": "b"})
    assert refused.value.permanent
