"""S3Store against moto's server, through real boto3 over HTTP."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from spotrun.clouds.aws.store import S3Store
from spotrun.clouds.store import StoreError, open_store
from tests.fakes import store_contract as contract
from tests.fakes.moto_server import ACCOUNT_ID, MotoServer, aws, moto_server  # noqa: F401

BUCKET = "spotrun-test-bucket"


@pytest.fixture
def store(aws: MotoServer) -> S3Store:  # noqa: F811
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    s = open_store(f"s3://{BUCKET}/team/runs")
    assert isinstance(s, S3Store)
    return s


def test_from_url_and_url_round_trip() -> None:
    s = S3Store.from_url("s3://b-1/a/b/")
    assert (s.bucket, s.prefix, s.url) == ("b-1", "a/b", "s3://b-1/a/b")
    assert S3Store.from_url("s3://b-1").url == "s3://b-1"
    with pytest.raises(StoreError):
        S3Store.from_url("gs://b-1/x")


def test_put_get_exists_size_delete(store: S3Store) -> None:
    contract.check_put_get_exists_size_delete(store)


def test_keys_live_under_the_prefix(store: S3Store) -> None:
    import boto3

    store.put_bytes("jobs/j1/a", b"1")
    raw = boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]
    assert [o["Key"] for o in raw] == ["team/runs/jobs/j1/a"]
    with pytest.raises(StoreError):
        store.put_bytes("jobs/../../escape", b"x")


def test_list_is_recursive_sorted_and_relative(store: S3Store) -> None:
    contract.check_list_is_recursive_sorted_relative(store)


def test_list_pages_past_1000_keys(store: S3Store) -> None:
    from moto.backends import get_backend

    s3 = get_backend("s3")[ACCOUNT_ID]["global"]
    for i in range(1005):  # straight into moto's backend: 1005 HTTP PUTs would take seconds
        s3.put_object(BUCKET, f"team/runs/many/{i:05d}", b"")
    keys = store.list("many/")
    assert len(keys) == 1005 and keys[0] == "many/00000" and keys[-1] == "many/01004"
    store.delete_prefix("many/")  # DeleteObjects in batches of 1000
    assert store.list("many/") == []


def test_large_file_goes_up_in_parts_and_comes_back_identical(store: S3Store, tmp_path: Path) -> None:
    import boto3

    contract.check_large_file_round_trip(store, tmp_path, 9 * 1024 * 1024 + 123)  # above the 8 MiB threshold
    head = boto3.client("s3").head_object(Bucket=BUCKET, Key="team/runs/jobs/j1/checkpoints/000000000010/model.pt")
    assert head["ETag"].strip('"').endswith("-2")  # a multipart ETag: two 8 MiB parts


def test_small_file_is_one_put(store: S3Store, tmp_path: Path) -> None:
    import boto3

    src = tmp_path / "small"
    src.write_bytes(b"abc")
    store.put_file("f", src)
    head = boto3.client("s3").head_object(Bucket=BUCKET, Key="team/runs/f")
    assert "-" not in head["ETag"]


def test_get_file_missing_raises_not_found_and_writes_nothing(store: S3Store, tmp_path: Path) -> None:
    contract.check_get_file_missing(store, tmp_path)


def test_if_absent_writes_once(store: S3Store) -> None:
    contract.check_if_absent_writes_once(store)


def test_if_absent_race_has_exactly_one_winner(store: S3Store) -> None:
    """Racing writers through separate clients: S3's If-None-Match decides, one wins."""
    contract.check_if_absent_race(lambda: S3Store(BUCKET, "team/runs"), rounds=5, writers=6)


def test_manifest_last_is_visible_in_order(store: S3Store, tmp_path: Path) -> None:
    """A reader that sees MANIFEST.json sees every file uploaded before it, complete."""
    big = tmp_path / "weights"
    big.write_bytes(os.urandom(9 * 1024 * 1024))
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if store.exists("ck/000000000005/MANIFEST.json"):
                seen.append(store.size("ck/000000000005/weights"))
                return

    t = threading.Thread(target=reader)
    t.start()
    store.put_file("ck/000000000005/weights", big)
    store.put_bytes("ck/000000000005/MANIFEST.json", b"{}")
    t.join(timeout=10)
    stop.set()
    assert seen == [big.stat().st_size]


def test_missing_bucket_is_a_store_error(aws: MotoServer) -> None:  # noqa: F811
    s = S3Store("no-such-bucket-here")
    with pytest.raises(StoreError, match="NoSuchBucket"):
        s.put_bytes("a", b"1")
