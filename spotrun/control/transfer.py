"""Moving a job between stores, for a relaunch on a cloud whose store is not the one it ran on.

`move_job(src, dst, job_id)` copies what a fresh instance of the job needs and nothing more:

    jobs/<id>/bundle/<sha256>.tar.gz   the code bundle job.json names   (content-addressed)
    data/<sha256>.tar.gz               every "store" data entry it names (content-addressed)
    jobs/<id>/checkpoints/<step>/...   the newest checkpoint in src that verifies
    jobs/<id>/job.json                 last: a dst holding it holds everything it names

Logs, heartbeats, exits and outputs stay where they were written (the controller reads them from
the store of the attempt that wrote them).

Every object is streamed: downloaded from `src` into a temp file, hashed from that file, uploaded
from it with `dst.put_file`, and deleted; memory use is the stores' chunk buffers, never a whole
file, and temp disk use is at most `workers` files at a time. A checkpoint file must match its
manifest's size and sha256 before it is uploaded; a content-addressed blob must match the sha256
in its name. After the files are up their sizes are re-read from `dst` (and, with
`deep_verify=True`, each one is downloaded again and re-hashed), and only then is `MANIFEST.json`
written, with the very bytes it had in `src`, so the Agent's uploader sees the restored checkpoint
as already there. A move that fails deletes what it wrote of the checkpoint, manifest first; a
dst never holds a manifest for a checkpoint whose files were not all copied and checked.

A checkpoint in `src` that is torn (no manifest, a file missing, a size or sha256 that does not
match) is passed over for the next older one, as the Agent does when it restores. Errors while
reading or writing a store raise `TransferError` naming the key: those are not torn checkpoints,
and falling back past them would silently throw work away.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from spotrun.checkpoint.format import (
    MANIFEST_NAME,
    entry_digest,
    file_digest,
    loads_bounded,
    read_manifest,
    step_dirname,
)
from spotrun.clouds.store import NotFound, Progress, Store, StoreError, job_prefix

DEFAULT_WORKERS = 4  # files in flight at once (each store also parallelizes within a big file)
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")


class TransferError(StoreError):
    """A move failed; `key` is the store key it failed on."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class TornCheckpoint(TransferError):
    """The checkpoint in the source store does not verify against its manifest."""

    def __init__(self, key: str, step: int, why: str) -> None:
        super().__init__(key, f"checkpoint {step} in the source store is torn: {why} ({key})")
        self.step = step


@dataclass(frozen=True)
class MoveReport:
    bytes_copied: int  # bytes written to dst (skipped objects not counted)
    objects_copied: int
    checkpoint_step: int | None  # the checkpoint now complete in dst; None: src had none that verifies
    verified: bool  # a checkpoint is in dst and was checked against its manifest after the move
    seconds: float
    objects_skipped: int = 0  # already in dst: content-addressed blobs, a checkpoint complete there
    torn_steps: tuple[int, ...] = ()  # newer checkpoints in src passed over because they were torn


def move_job(
    src: Store,
    dst: Store,
    job_id: str,
    *,
    progress: Progress | None = None,
    workers: int = DEFAULT_WORKERS,
    deep_verify: bool = False,
    tmp_dir: Path | str | None = None,
) -> MoveReport:
    """Copy to `dst` everything a fresh instance of `job_id` needs from `src` (see the module doc).

    `progress(n)` is fed the bytes as they reach dst (from several threads: it is serialized here).
    `deep_verify` re-downloads every checkpoint file from dst and re-hashes it before the manifest
    is written (doubles the traffic; the default re-reads sizes and trusts the hash taken in transit).
    Raises TransferError (naming the key) on any store failure; what it raised on is not committed.
    """
    from spotrun.agent.jobfile import AgentJob

    started = time.monotonic()
    prefix = job_prefix(job_id)
    with _Mover(src, dst, progress, workers, deep_verify, tmp_dir) as mover:
        job_key = f"{prefix}/job.json"
        job_bytes = mover.read_small(job_key)
        try:
            job = AgentJob.from_json(job_bytes)
        except (ValueError, TypeError) as e:
            raise TransferError(job_key, f"{job_key} in {src.url} is not a valid job file: {e}") from None
        if job.job_id != job_id:
            raise TransferError(job_key, f"{job_key} in {src.url} is for job {job.job_id!r}, not {job_id!r}")

        blobs = [job.bundle] if job.bundle else []
        blobs += [item.source for item in job.data if item.kind == "store"]
        for key in dict.fromkeys(blobs):  # once each, in order
            mover.copy_blob(key)

        step, torn = mover.copy_newest_checkpoint(job_id)
        mover.write_small(job_key, job_bytes)  # last: dst now has everything job.json names
        return MoveReport(
            bytes_copied=mover.bytes_copied,
            objects_copied=mover.objects_copied,
            checkpoint_step=step,
            verified=step is not None,
            seconds=time.monotonic() - started,
            objects_skipped=mover.objects_skipped,
            torn_steps=tuple(torn),
        )


def copy_checkpoint(
    src: Store,
    dst: Store,
    job_id: str,
    step: int,
    *,
    progress: Progress | None = None,
    workers: int = DEFAULT_WORKERS,
    deep_verify: bool = False,
    tmp_dir: Path | str | None = None,
) -> int:
    """Copy checkpoint `step` of `job_id`, files first and manifest last; the bytes written to dst
    (0 when it was already complete there). Raises TornCheckpoint when it does not verify in src,
    TransferError on a store failure; either way dst is left without a manifest for it."""
    with _Mover(src, dst, progress, workers, deep_verify, tmp_dir) as mover:
        mover.copy_checkpoint(job_id, step)
        return mover.bytes_copied


def checkpoint_steps(store: Store, job_id: str) -> dict[int, set[str]]:
    """step -> file names present under `jobs/<id>/checkpoints/<step>/` (MANIFEST.json included)."""
    from spotrun.agent.sync import store_checkpoints

    return store_checkpoints(store, job_prefix(job_id))


class _Mover:
    """One move: the two stores, a temp folder, the counters. Objects go through `_stream`."""

    def __init__(
        self,
        src: Store,
        dst: Store,
        progress: Progress | None,
        workers: int,
        deep_verify: bool,
        tmp_dir: Path | str | None,
    ) -> None:
        self.src, self.dst = src, dst
        self.workers = max(1, workers)
        self.deep_verify = deep_verify
        self.bytes_copied = self.objects_copied = self.objects_skipped = 0
        self._lock = threading.Lock()
        self._names = count()
        self._tmp_root = tempfile.TemporaryDirectory(prefix="spotrun-move-", dir=tmp_dir)
        self.tmp = Path(self._tmp_root.name)
        self._progress = _serialized(progress)

    def __enter__(self) -> _Mover:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp_root.cleanup()

    # ------------------------------------------------------------------ single objects

    def _temp_path(self) -> Path:
        with self._lock:
            return self.tmp / f"obj-{next(self._names)}"

    def _copied(self, size: int) -> None:
        with self._lock:
            self.bytes_copied += size
            self.objects_copied += 1

    def _skipped(self, n: int = 1) -> None:
        with self._lock:
            self.objects_skipped += n

    def read_small(self, key: str) -> bytes:
        """A small object (job.json) from src, whole."""
        try:
            return self.src.get_bytes(key)
        except NotFound:
            raise TransferError(key, f"{key} is missing in {self.src.url}") from None
        except Exception as e:
            raise TransferError(key, f"reading {key} from {self.src.url} failed: {e}") from e

    def write_small(self, key: str, data: bytes) -> None:
        try:
            self.dst.put_bytes(key, data)
        except Exception as e:
            raise TransferError(key, f"writing {key} to {self.dst.url} failed: {e}") from e
        if self._progress:
            self._progress(len(data))
        self._copied(len(data))

    def _stream(self, key: str, *, size: int | None, sha256: str | None, torn: Callable[[str], Exception]) -> int:
        """get_file into a temp file, check size/sha256, put_file, re-read the size in dst; the size."""
        path = self._temp_path()
        try:
            return self._stream_via(path, key, size=size, sha256=sha256, torn=torn)
        except TransferError:
            raise
        except Exception as e:  # the local temp file: disk full, permissions
            raise TransferError(key, f"copying {key} through {path.parent} failed: {e}") from e
        finally:
            path.unlink(missing_ok=True)

    def _stream_via(
        self, path: Path, key: str, *, size: int | None, sha256: str | None, torn: Callable[[str], Exception]
    ) -> int:
        try:
            self.src.get_file(key, path)
        except NotFound:
            raise torn("missing") from None
        except Exception as e:
            raise TransferError(key, f"reading {key} from {self.src.url} failed: {e}") from e
        got_size = path.stat().st_size
        if size is not None and got_size != size:
            raise torn(f"{got_size} bytes, expected {size}")
        if sha256 is not None and (digest := file_digest(path, sha256)) != sha256:  # or a manifest's CRCs
            raise torn(f"digest {digest[:18]}..., expected {sha256[:18]}...")
        try:
            self.dst.put_file(key, path, progress=self._progress)
            written = self.dst.size(key)
        except Exception as e:
            raise TransferError(key, f"writing {key} to {self.dst.url} failed: {e}") from e
        if written != got_size:
            raise TransferError(key, f"{key} in {self.dst.url} has {written} bytes after the copy, not {got_size}")
        if self.deep_verify and sha256 is not None:
            self._reverify(key, sha256)
        self._copied(got_size)
        return got_size

    def _reverify(self, key: str, sha256: str) -> None:
        if not self._dst_hash_matches(key, sha256):
            raise TransferError(key, f"{key} in {self.dst.url} does not match its sha256 after the copy")

    def _dst_hash_matches(self, key: str, sha256: str) -> bool:
        """Download `key` from dst again and hash it (False when it is missing there)."""
        path = self._temp_path()
        try:
            self.dst.get_file(key, path)
            return file_digest(path, sha256) == sha256
        except NotFound:
            return False
        except Exception as e:
            raise TransferError(key, f"re-reading {key} from {self.dst.url} failed: {e}") from e
        finally:
            path.unlink(missing_ok=True)

    def copy_blob(self, key: str) -> None:
        """A content-addressed blob (bundle, store data): skipped when dst holds the same bytes (size,
        and the sha256 in its name), else copied and checked against that sha256."""
        try:
            size = self.src.size(key)
        except NotFound:
            raise TransferError(key, f"{key} is missing in {self.src.url}") from None
        except Exception as e:
            raise TransferError(key, f"reading {key} from {self.src.url} failed: {e}") from e
        stem = key.rsplit("/", 1)[-1].removesuffix(".tar.gz")
        expected = stem if _SHA256_NAME.match(stem) else None
        try:
            # never trusted by its name alone: the same size and (named by it) the same sha256
            if self.dst.size(key) == size and (expected is None or self._dst_hash_matches(key, expected)):
                self._skipped()
                return
        except NotFound:
            pass
        except TransferError:
            raise
        except Exception as e:
            raise TransferError(key, f"reading {key} from {self.dst.url} failed: {e}") from e

        def corrupt(why: str) -> Exception:
            return TransferError(key, f"{key} in {self.src.url} is corrupt: {why}")

        self._stream(key, size=size, sha256=expected, torn=corrupt)

    # ------------------------------------------------------------------ checkpoints

    def copy_newest_checkpoint(self, job_id: str) -> tuple[int | None, list[int]]:
        """The newest checkpoint in src that verifies, into dst; (its step or None, torn steps passed over)."""
        prefix = f"{job_prefix(job_id)}/checkpoints/"
        try:
            found = checkpoint_steps(self.src, job_id)
        except Exception as e:
            raise TransferError(prefix, f"listing {prefix} in {self.src.url} failed: {e}") from e
        torn: list[int] = []
        for step in sorted(found, reverse=True):
            if MANIFEST_NAME not in found[step]:
                torn.append(step)
                continue
            try:
                self.copy_checkpoint(job_id, step)
            except TornCheckpoint:
                torn.append(step)
                continue
            return step, torn
        return None, torn

    def _manifest(self, key: str, step: int) -> tuple[bytes, dict[str, dict]]:
        """The manifest of `step` in src, validated as checkpoint_format reads one from disk."""
        try:
            data = self.src.get_bytes(key)
        except NotFound:
            raise TornCheckpoint(key, step, "no manifest") from None
        except Exception as e:
            raise TransferError(key, f"reading {key} from {self.src.url} failed: {e}") from e
        folder = self.tmp / f"manifest-{next(self._names)}" / step_dirname(step)
        folder.mkdir(parents=True)
        (folder / MANIFEST_NAME).write_bytes(data)
        manifest = read_manifest(folder)
        if manifest is None:
            raise TornCheckpoint(key, step, "manifest is malformed")
        return data, manifest["files"]

    def _complete_in_dst(self, base: str, files: dict[str, dict]) -> bool:
        """dst already holds this checkpoint: the same manifest entries and every file at its size
        (and, with deep_verify, its sha256)."""
        try:
            theirs = loads_bounded(self.dst.get_bytes(base + MANIFEST_NAME)).get("files")  # type: ignore[attr-defined]
        except NotFound:
            return False
        except (ValueError, AttributeError):
            return False  # a garbled manifest: recopy over it
        except Exception as e:
            key = base + MANIFEST_NAME
            raise TransferError(key, f"reading {key} from {self.dst.url} failed: {e}") from e
        if theirs != files:
            return False

        def same(rel: str) -> bool:
            key = base + rel
            try:
                if self.dst.size(key) != files[rel]["size"]:
                    return False
            except NotFound:
                return False
            except Exception as e:
                raise TransferError(key, f"reading {key} from {self.dst.url} failed: {e}") from e
            return not self.deep_verify or self._dst_hash_matches(key, entry_digest(files[rel]))

        return all(self._map(same, sorted(files)))

    def copy_checkpoint(self, job_id: str, step: int) -> None:
        base = f"{job_prefix(job_id)}/checkpoints/{step_dirname(step)}/"
        manifest_key = base + MANIFEST_NAME
        manifest_bytes, files = self._manifest(manifest_key, step)

        def src_size(rel: str) -> None:  # cheap HEADs first: a torn checkpoint moves no bytes
            key = base + rel
            try:
                size = self.src.size(key)
            except NotFound:
                raise TornCheckpoint(key, step, "file missing") from None
            except Exception as e:
                raise TransferError(key, f"reading {key} from {self.src.url} failed: {e}") from e
            if size != files[rel]["size"]:
                raise TornCheckpoint(key, step, f"{size} bytes, manifest says {files[rel]['size']}")

        self._map(src_size, sorted(files))
        if self._complete_in_dst(base, files):
            self._skipped(len(files) + 1)
            return

        written: list[str] = []

        def copy_file(rel: str) -> None:
            key = base + rel
            entry = files[rel]
            with self._lock:
                written.append(key)

            def torn(why: str) -> Exception:
                return TornCheckpoint(key, step, why)

            self._stream(key, size=entry["size"], sha256=entry_digest(entry), torn=torn)

        try:
            self.dst.delete(manifest_key)  # un-commit whatever dst had at this step before touching files
            self._map(copy_file, sorted(files, key=lambda r: -files[r]["size"]))  # biggest first
            self.write_small(manifest_key, manifest_bytes)
        except TransferError:
            self._uncommit(manifest_key, written)
            raise
        except BaseException as e:  # a bug, or an interrupt: still never leave a half-copied checkpoint
            self._uncommit(manifest_key, written)
            if not isinstance(e, Exception):
                raise
            raise TransferError(manifest_key, f"moving checkpoint {step} to {self.dst.url} failed: {e}") from e

    def _uncommit(self, manifest_key: str, keys: Iterable[str]) -> None:
        """Best effort after a failure: manifest first (so nothing looks complete), then the files."""
        for key in [manifest_key, *keys]:
            try:
                self.dst.delete(key)
            except Exception:  # the store may be what failed; an orphan file without manifest is inert
                pass

    def _map(self, fn: Callable[[str], object], items: list[str]) -> list[object]:
        """fn over items on up to `workers` threads; the first failure cancels the rest and is raised
        (a store failure in preference to a torn file, so a broken dst is not mistaken for a torn src)."""
        if len(items) <= 1 or self.workers == 1:
            return [fn(item) for item in items]
        pool = ThreadPoolExecutor(max_workers=min(self.workers, len(items)), thread_name_prefix="spotrun-move")
        futures: list[Future[object]] = [pool.submit(fn, item) for item in items]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done):
                for f in futures:
                    f.cancel()
        finally:
            pool.shutdown(wait=True)
        errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, TornCheckpoint)), errors[0])
        return [f.result() for f in futures]


def _serialized(progress: Progress | None) -> Progress | None:
    """The stores call progress from their own transfer threads; the caller's callback need not be
    thread-safe."""
    if progress is None:
        return None
    lock = threading.Lock()

    def call(n: int) -> None:
        with lock:
            progress(n)

    return call
