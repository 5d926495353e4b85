"""AzureBlobStore against Azurite on loopback, through the real azure-storage-blob client."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotrun.clouds.azure.store import AzureBlobStore
from spotrun.clouds.store import StoreError, open_store
from tests.fakes import store_contract as contract
from tests.fakes.storage_emulators import Azurite, azurite_fixture, azurite_server_fixture, make_azure_container, unique  # noqa: F401  (fixtures)


@pytest.fixture
def container(azurite: Azurite) -> str:
    name = unique("spotrun")
    make_azure_container(azurite, name)
    return name


@pytest.fixture
def store(container: str) -> AzureBlobStore:
    s = open_store(f"az://{container}/team/runs")
    assert isinstance(s, AzureBlobStore)
    return s


def test_from_url_and_url_round_trip() -> None:
    s = AzureBlobStore.from_url("az://c-1/a/b/")
    assert (s.container_name, s.account, s.prefix, s.url) == ("c-1", None, "a/b", "az://c-1/a/b")
    s = AzureBlobStore.from_url("az://c-1@acct/x")
    assert (s.container_name, s.account, s.url) == ("c-1", "acct", "az://c-1@acct/x")
    with pytest.raises(StoreError):
        AzureBlobStore.from_url("gs://c/x")


def test_no_account_anywhere_says_how_to_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_ACCOUNT_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StoreError, match="AZURE_STORAGE_CONNECTION_STRING"):
        AzureBlobStore.from_url("az://c/x").exists("k")


def test_put_get_exists_size_delete(store: AzureBlobStore) -> None:
    contract.check_put_get_exists_size_delete(store)


def test_keys_live_under_the_prefix(store: AzureBlobStore) -> None:
    store.put_bytes("jobs/j1/a", b"1")
    assert [b.name for b in store.container.list_blobs()] == ["team/runs/jobs/j1/a"]


def test_list_is_recursive_sorted_and_relative(store: AzureBlobStore) -> None:
    contract.check_list_is_recursive_sorted_relative(store)


def test_large_file_goes_up_in_blocks_and_comes_back_identical(store: AzureBlobStore, tmp_path: Path) -> None:
    from spotrun.clouds.azure.store import TRANSFER_OPTIONS

    contract.check_large_file_round_trip(store, tmp_path, TRANSFER_OPTIONS["max_block_size"] + 4321)
    blob = store.container.get_blob_client("team/runs/jobs/j1/checkpoints/000000000010/model.pt")
    committed, _uncommitted = blob.get_block_list()
    assert len(committed) == 2  # Put Block x2 + Put Block List: never visible half-written


def test_get_file_missing_raises_not_found_and_writes_nothing(store: AzureBlobStore, tmp_path: Path) -> None:
    contract.check_get_file_missing(store, tmp_path)


def test_if_absent_writes_once(store: AzureBlobStore) -> None:
    contract.check_if_absent_writes_once(store)


def test_if_absent_race_has_exactly_one_winner(store: AzureBlobStore, container: str) -> None:
    contract.check_if_absent_race(lambda: AzureBlobStore(container, "team/runs"))


def test_missing_container_is_a_store_error(azurite: Azurite) -> None:
    with pytest.raises(StoreError, match="no-such-container"):
        AzureBlobStore("no-such-container").put_bytes("a", b"1")


def test_errors_never_show_the_account_key(azurite: Azurite) -> None:
    from tests.fakes.storage_emulators import AZURITE_KEY

    with pytest.raises(StoreError) as info:
        AzureBlobStore("no-such-container").get_bytes("a")
    assert AZURITE_KEY not in str(info.value) and AZURITE_KEY[:20] not in repr(info.value.__dict__)
