"""Moving a job between stores (spotrun.control.transfer): what moves, verification, fallback, failures.

Local and S3 (moto server) always run; GCS and Azure Blob run against fake-gcs-server and Azurite
when they are installed (scripts/install_test_services.sh) and are skipped with that reason if not.
"""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest

from spotrun.agent.jobfile import AgentJob, DataItem
from spotrun.agent.sync import restore_latest
from spotrun.checkpoint.format import MANIFEST_NAME, crc_file, verify_checkpoint, write_manifest
from spotrun.clouds.store import LocalStore, NotFound, Progress, Store, StoreError, open_store
from spotrun.control.transfer import MoveReport, TornCheckpoint, TransferError, copy_checkpoint, move_job
from tests.fakes.moto_server import MotoServer, aws, moto_server  # noqa: F401  (fixtures)
from tests.fakes.storage_emulators import (  # noqa: F401  (fixtures)
    Azurite,
    GCSEmulator,
    azurite_fixture,
    azurite_server_fixture,
    gcs_emulator_fixture,
    gcs_emulator_server_fixture,
    make_azure_container,
    make_gcs_bucket,
    unique,
)

JOB = "train-abc123"
CKPT = f"jobs/{JOB}/checkpoints"
MiB = 1024 * 1024


# --------------------------------------------------------------------------- building a job in a store


def blob_key(data: bytes, folder: str) -> str:
    return f"{folder}/{hashlib.sha256(data).hexdigest()}.tar.gz"


def put_checkpoint(store: Store, tmp: Path, step: int, files: dict[str, bytes]) -> bytes:
    """A checkpoint made on disk as the library makes one, uploaded as the Agent does (manifest last)."""
    folder = tmp / "made" / f"{step:012d}"
    folder.mkdir(parents=True)
    entries = {}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
        entries[rel] = (len(data), crc_file(folder / rel))  # format 2, as the library writes
    write_manifest(folder, step, entries)
    for rel in files:
        store.put_file(f"{CKPT}/{step:012d}/{rel}", folder / rel)
    manifest = (folder / MANIFEST_NAME).read_bytes()
    store.put_bytes(f"{CKPT}/{step:012d}/{MANIFEST_NAME}", manifest)
    return manifest


def weights(step: int, size: int = 3000) -> dict[str, bytes]:
    return {"model.bin": bytes([step % 251]) * size, "state/opt.bin": os.urandom(size // 3), "rng.json": b"{}"}


def put_job(store: Store, tmp: Path, steps: tuple[int, ...] = (10, 20)) -> dict[str, str]:
    """A job as the controller and an Agent leave it: job.json, bundle, data, checkpoints, logs."""
    bundle, data_a, data_b = b"code" * 500, b"dataset-a" * 700, b"dataset-b" * 300
    keys = {"bundle": blob_key(bundle, f"jobs/{JOB}/bundle")}
    keys |= {"a": blob_key(data_a, "data"), "b": blob_key(data_b, "data")}
    for name, payload in (("bundle", bundle), ("a", data_a), ("b", data_b)):
        store.put_bytes(keys[name], payload)
    job = AgentJob(
        job_id=JOB,
        name="train",
        run="python train.py",
        bundle=keys["bundle"],
        data=[
            DataItem(keys["a"], "a"),
            DataItem(keys["b"], "b"),
            DataItem(keys["a"], "a-again"),  # named twice: copied once
            DataItem("s3://elsewhere/imagenet", "imagenet", kind="url"),  # read in place, not moved
        ],
    )
    store.put_bytes(f"jobs/{JOB}/job.json", job.to_json().encode())
    for step in steps:
        put_checkpoint(store, tmp / f"src-{step}", step, weights(step))
    store.put_bytes(f"jobs/{JOB}/attempts/1/log/00000000", b"hello\n")
    store.put_bytes(f"jobs/{JOB}/attempts/1/exit", b'{"code": 0}')
    store.put_bytes("data/someone-elses.tar.gz", b"not ours")
    return keys


def restored(store: Store, tmp: Path) -> int | None:
    """What the Agent on a fresh instance would restore from `store`, fully verified."""
    notes: list[str] = []
    step = restore_latest(store, f"jobs/{JOB}", tmp / "restore", notes.append)
    assert step is None or verify_checkpoint(tmp / "restore" / f"{step:012d}")
    return step


def assert_moved(src: Store, dst: Store, keys: dict[str, str], report: MoveReport, tmp: Path, step: int) -> None:
    assert (report.checkpoint_step, report.verified) == (step, True)
    for key in (f"jobs/{JOB}/job.json", *keys.values()):
        assert dst.get_bytes(key) == src.get_bytes(key), key
    assert restored(dst, tmp) == step
    base = f"{CKPT}/{step:012d}/"
    assert dst.get_bytes(base + MANIFEST_NAME) == src.get_bytes(base + MANIFEST_NAME)  # the very bytes
    moved = dst.list("")
    assert not [k for k in moved if "/attempts/" in k or k == "data/someone-elses.tar.gz"]
    assert not [k for k in moved if k.startswith(CKPT) and not k.startswith(base)]  # only the newest


# --------------------------------------------------------------------------- store wrappers for tests


class Recording(Store):
    """Wraps a store: records writes, checks streaming use, and can fail a checkpoint write (the
    n-th put_file, or the manifest's put_bytes), after which it is down: deletes fail too, so no
    cleanup after the failure can hide what was left before it."""

    def __init__(self, inner: Store, *, fail_put: str | None = None, fail_after: int = 0) -> None:
        self.inner, self.url = inner, inner.url
        self.puts: list[str] = []
        self.fail_put, self.fail_after = fail_put, fail_after
        self.down = False

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        assert len(data) < MiB, f"{key}: {len(data)} bytes passed in memory"
        if self.fail_put == "put_bytes" and key.endswith(MANIFEST_NAME):
            self.down = True
            raise StoreError(f"injected failure writing {key}")
        self.puts.append(key)
        return self.inner.put_bytes(key, data, if_absent=if_absent)

    def get_bytes(self, key: str) -> bytes:
        assert key.endswith((".json", "exit")), f"{key} read whole into memory"
        return self.inner.get_bytes(key)

    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        assert isinstance(path, Path) and path.is_file(), f"put_file({key}) without a file on disk"
        if self.fail_put == "put_file" and len(self.puts) >= self.fail_after and "/checkpoints/" in key:
            self.down = True
            self.inner.put_file(key, path.parent / "nonexistent", progress)  # fails midway, as a network does
        self.puts.append(key)
        self.inner.put_file(key, path, progress)

    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        self.inner.get_file(key, path, progress)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        if self.down:
            raise StoreError(f"store unreachable deleting {key}")
        self.inner.delete(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)


# --------------------------------------------------------------------------- local -> local


def test_moves_what_a_fresh_instance_needs_and_nothing_else(tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "src"), LocalStore(tmp_path / "dst")
    keys = put_job(src, tmp_path)
    seen: list[int] = []
    report = move_job(src, dst, JOB, progress=seen.append)
    assert_moved(src, dst, keys, report, tmp_path, step=20)
    # job.json, bundle, 2 data blobs, 3 checkpoint files + manifest
    assert report.objects_copied == 8 and report.objects_skipped == 0 and report.torn_steps == ()
    assert sum(seen) == report.bytes_copied == sum(dst.size(k) for k in dst.list(""))
    assert report.seconds >= 0

    again = move_job(src, dst, JOB)  # all there already: only job.json is rewritten
    assert (again.objects_copied, again.bytes_copied) == (1, dst.size(f"jobs/{JOB}/job.json"))
    assert again.objects_skipped == 3 + 4 and (again.checkpoint_step, again.verified) == (20, True)


def test_a_newer_checkpoint_in_src_moves_next_to_the_older_one_in_dst(tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "src"), LocalStore(tmp_path / "dst")
    put_job(src, tmp_path, steps=(10,))
    move_job(src, dst, JOB)
    put_checkpoint(src, tmp_path / "later", 30, weights(30))
    report = move_job(src, dst, JOB)
    assert report.checkpoint_step == 30 and restored(dst, tmp_path) == 30
    assert report.objects_skipped == 3  # bundle and data already there


def test_a_job_without_checkpoints_moves_its_code_and_data(tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "src"), LocalStore(tmp_path / "dst")
    put_job(src, tmp_path, steps=())
    report = move_job(src, dst, JOB)
    assert (report.checkpoint_step, report.verified, report.objects_copied) == (None, False, 4)
    assert restored(dst, tmp_path) is None


def test_torn_newest_checkpoints_fall_back_to_the_newest_complete_one(tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "src"), LocalStore(tmp_path / "dst")
    keys = put_job(src, tmp_path, steps=(10, 20, 30, 40))
    src.delete(f"{CKPT}/000000000040/{MANIFEST_NAME}")  # upload cut before the manifest
    flipped = bytearray(src.get_bytes(f"{CKPT}/000000000030/model.bin"))  # same size, one bit off
    flipped[1234] ^= 1
    src.put_bytes(f"{CKPT}/000000000030/model.bin", bytes(flipped))
    src.delete(f"{CKPT}/000000000020/state/opt.bin")  # a file gone
    put_checkpoint(src, tmp_path / "bad", 50, weights(50))
    src.put_bytes(f"{CKPT}/000000000050/{MANIFEST_NAME}", b'{"format": 1, "step": 49, "files": {}}')  # garbled

    report = move_job(src, dst, JOB)
    assert_moved(src, dst, keys, report, tmp_path, step=10)
    assert report.torn_steps == (50, 40, 30, 20)
    assert not [k for k in dst.list(CKPT) if "/000000000010/" not in k]  # nothing of the torn ones left


def test_content_addressed_blobs_already_in_dst_are_not_sent_again(tmp_path: Path) -> None:
    src = LocalStore(tmp_path / "src")
    keys = put_job(src, tmp_path)
    dst = Recording(LocalStore(tmp_path / "dst"))
    for name in ("a", "bundle"):
        dst.inner.put_bytes(keys[name], src.get_bytes(keys[name]))
    dst.inner.put_bytes(keys["b"], b"truncated")  # same name, wrong size: copied over
    report = move_job(src, dst, JOB)
    assert keys["a"] not in dst.puts and keys["bundle"] not in dst.puts
    assert dst.puts.count(keys["b"]) == 1 and dst.inner.get_bytes(keys["b"]) == src.get_bytes(keys["b"])
    assert report.objects_skipped == 2


def test_a_blob_whose_content_does_not_match_its_name_is_refused(tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "src"), LocalStore(tmp_path / "dst")
    keys = put_job(src, tmp_path)
    src.put_bytes(keys["b"], b"X" * src.size(keys["b"]))
    with pytest.raises(TransferError, match="corrupt") as err:
        move_job(src, dst, JOB)
    assert err.value.key == keys["b"]
    assert not dst.exists(keys["b"]) and not dst.exists(f"jobs/{JOB}/job.json")


@pytest.mark.parametrize("how", ["put_file", "put_bytes"])
def test_a_failure_mid_copy_leaves_no_manifest_in_dst(tmp_path: Path, how: str) -> None:
    src = LocalStore(tmp_path / "src")
    put_job(src, tmp_path)
    dst = Recording(LocalStore(tmp_path / "dst"), fail_put=how, fail_after=5)
    # dst already held another save of step 20 (complete): it must be un-committed, not left mixed
    put_checkpoint(dst.inner, tmp_path / "old", 20, weights(21))
    with pytest.raises(TransferError) as err:
        move_job(src, dst, JOB, workers=1)
    assert err.value.key.startswith(f"{CKPT}/000000000020/") and err.value.key in str(err.value)
    assert dst.url in str(err.value)
    assert not [k for k in dst.list("") if k.endswith(MANIFEST_NAME)]
    assert not dst.exists(f"jobs/{JOB}/job.json")
    assert restored(dst, tmp_path) is None

    report = move_job(src, dst.inner, JOB)  # a retry completes it
    assert report.checkpoint_step == 20 and restored(dst.inner, tmp_path / "2") == 20


def test_missing_or_foreign_job_file_is_a_clear_error(tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "src"), LocalStore(tmp_path / "dst")
    with pytest.raises(TransferError, match=f"jobs/{JOB}/job.json is missing in file://"):
        move_job(src, dst, JOB)
    put_job(src, tmp_path)
    src.put_bytes(f"jobs/{JOB}/job.json", AgentJob(job_id="other", name="x", run="true").to_json().encode())
    with pytest.raises(TransferError, match="is for job 'other'"):
        move_job(src, dst, JOB)


def test_copy_checkpoint_bytes_skip_and_torn(tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "src"), LocalStore(tmp_path / "dst")
    put_job(src, tmp_path, steps=(10, 20))
    size = sum(src.size(k) for k in src.list(f"{CKPT}/000000000010/"))
    assert copy_checkpoint(src, dst, JOB, 10) == size
    assert copy_checkpoint(src, dst, JOB, 10) == 0  # complete in dst already
    assert copy_checkpoint(src, dst, JOB, 10, deep_verify=True) == 0  # still complete, hashes re-read
    dst.put_bytes(f"{CKPT}/000000000010/rng.json", b"[]")  # same size, other bytes: deep check catches it
    assert copy_checkpoint(src, dst, JOB, 10, deep_verify=True) == size
    src.put_bytes(f"{CKPT}/000000000020/rng.json", b"{ }")
    with pytest.raises(TornCheckpoint, match="checkpoint 20 .* torn") as err:
        copy_checkpoint(src, dst, JOB, 20)
    assert err.value.step == 20 and err.value.key == f"{CKPT}/000000000020/rng.json"
    assert dst.list(f"{CKPT}/000000000020/") == []


def test_a_big_file_streams_through_a_temp_file(tmp_path: Path) -> None:
    """A 48 MiB checkpoint file moves with Python's peak allocations well under its size."""
    src = Recording(LocalStore(tmp_path / "src"))
    put_job(src.inner, tmp_path, steps=())
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(MiB))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    folder = tmp_path / "ck" / "000000000007"
    folder.mkdir(parents=True)
    os.replace(big, folder / "weights.bin")
    write_manifest(folder, 7, {"weights.bin": (48 * MiB, digest)})
    src.inner.put_file(f"{CKPT}/000000000007/weights.bin", folder / "weights.bin")
    src.inner.put_file(f"{CKPT}/000000000007/{MANIFEST_NAME}", folder / MANIFEST_NAME)
    dst = Recording(LocalStore(tmp_path / "dst"))

    tracemalloc.start()
    try:
        report = move_job(src, dst, JOB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.checkpoint_step == 7 and report.bytes_copied > 48 * MiB
    assert peak < 24 * MiB, f"peak {peak / MiB:.1f} MiB for a 48 MiB file"
    assert restored(dst.inner, tmp_path) == 7


# --------------------------------------------------------------------------- across real store clients


def test_local_to_s3(tmp_path: Path, aws: MotoServer) -> None:  # noqa: F811
    import boto3

    boto3.client("s3").create_bucket(Bucket="spotrun-move")
    src, dst = LocalStore(tmp_path / "src"), open_store("s3://spotrun-move/team")
    keys = put_job(src, tmp_path)
    put_checkpoint(src, tmp_path / "big", 30, {"model.bin": os.urandom(9 * MiB), "rng.json": b"{}"})  # multipart
    report = move_job(src, dst, JOB)
    assert_moved(src, dst, keys, report, tmp_path, step=30)
    back = move_job(dst, LocalStore(tmp_path / "back"), JOB, deep_verify=True)  # and out of S3
    assert (back.checkpoint_step, back.verified) == (30, True)


def test_gcs_to_azure_and_back(tmp_path: Path, gcs_emulator: GCSEmulator, azurite: Azurite) -> None:
    bucket, container = unique("spotrun-move"), unique("spotrun-move")
    make_gcs_bucket(gcs_emulator, bucket)
    make_azure_container(azurite, container)
    gs, az = open_store(f"gs://{bucket}/runs"), open_store(f"az://{container}/runs")
    keys = put_job(gs, tmp_path)
    report = move_job(gs, az, JOB, deep_verify=True)
    assert_moved(gs, az, keys, report, tmp_path / "az", step=20)
    put_checkpoint(az, tmp_path / "on-azure", 25, weights(25))  # the job ran on in Azure
    back = move_job(az, gs, JOB)
    assert (back.checkpoint_step, back.objects_skipped) == (25, 3)
    assert restored(gs, tmp_path / "gs") == 25


def test_recording_store_really_fails(tmp_path: Path) -> None:
    """The injected failure is a real mid-write one: LocalStore leaves no object behind."""
    dst = Recording(LocalStore(tmp_path), fail_put="put_file")
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(FileNotFoundError):
        dst.put_file(f"{CKPT}/1/f", tmp_path / "f")
    with pytest.raises(NotFound):
        dst.size(f"{CKPT}/1/f")
