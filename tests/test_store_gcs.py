"""GCSStore against fake-gcs-server on loopback, through the real google-cloud-storage client."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotrun.clouds.gcp.store import RESUMABLE_THRESHOLD, GCSStore
from spotrun.clouds.store import StoreError, open_store
from tests.fakes import store_contract as contract
from tests.fakes.storage_emulators import (  # noqa: F401  (fixtures)
    GCSEmulator,
    gcs_emulator_fixture,
    gcs_emulator_server_fixture,
    make_gcs_bucket,
    unique,
)


@pytest.fixture
def bucket(gcs_emulator: GCSEmulator) -> str:
    name = unique("spotrun-test")
    make_gcs_bucket(gcs_emulator, name)
    return name


@pytest.fixture
def store(bucket: str) -> GCSStore:
    s = open_store(f"gs://{bucket}/team/runs")
    assert isinstance(s, GCSStore)
    return s


def test_from_url_and_url_round_trip() -> None:
    s = GCSStore.from_url("gs://b-1/a/b/")
    assert (s.bucket_name, s.prefix, s.url) == ("b-1", "a/b", "gs://b-1/a/b")
    assert GCSStore.from_url("gs://b-1").url == "gs://b-1"
    with pytest.raises(StoreError):
        GCSStore.from_url("s3://b-1/x")
    with pytest.raises(StoreError):
        GCSStore.from_url("gs:///x")


def test_put_get_exists_size_delete(store: GCSStore) -> None:
    contract.check_put_get_exists_size_delete(store)


def test_keys_live_under_the_prefix(store: GCSStore, bucket: str) -> None:
    store.put_bytes("jobs/j1/a", b"1")
    raw = [b.name for b in store._client.list_blobs(bucket)]  # the real client, unprefixed
    assert raw == ["team/runs/jobs/j1/a"]


def test_list_is_recursive_sorted_and_relative(store: GCSStore) -> None:
    contract.check_list_is_recursive_sorted_relative(store)


def test_large_file_goes_up_resumably_and_comes_back_identical(store: GCSStore, tmp_path: Path) -> None:
    contract.check_large_file_round_trip(store, tmp_path, RESUMABLE_THRESHOLD + 4321)


def test_get_file_missing_raises_not_found_and_writes_nothing(store: GCSStore, tmp_path: Path) -> None:
    contract.check_get_file_missing(store, tmp_path)


def test_if_absent_writes_once(store: GCSStore) -> None:
    contract.check_if_absent_writes_once(store)


def test_if_absent_race_has_exactly_one_winner(store: GCSStore, bucket: str) -> None:
    contract.check_if_absent_race(lambda: GCSStore(bucket, "team/runs"))


def test_missing_bucket_is_a_store_error(gcs_emulator: GCSEmulator) -> None:
    with pytest.raises(StoreError, match="no-such-bucket"):
        GCSStore("no-such-bucket-here").put_bytes("a", b"1")
