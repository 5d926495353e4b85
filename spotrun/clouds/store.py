"""Object storage shared by the controller and the instances: the only thing instances share.

Keys are '/'-separated paths relative to the store's root. The job layout (DESIGN.md):

    jobs/<job_id>/job.json                   what the Agent runs (written by the controller)
    jobs/<job_id>/bundle/<sha256>.tar.gz     the code bundle
    data/<sha256>.tar.gz                     local data entries, content-addressed, store-wide
    jobs/<job_id>/checkpoints/<step>/...     checkpoint files, MANIFEST.json written last
    jobs/<job_id>/attempts/<n>/log/<seq>     log chunks, in order
    jobs/<job_id>/attempts/<n>/heartbeat     JSON, rewritten every few seconds
    jobs/<job_id>/attempts/<n>/exit          JSON {"code": int, "reason": str}, written once

Implementations: `LocalStore` here; S3, GCS and Azure Blob in `store_s3`, `store_gcs`,
`store_azure` (their SDKs imported only there). `open_store(url)` picks one by URL scheme.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

Progress = Callable[[int], None]  # called with the number of bytes just moved


class StoreError(Exception):
    pass


class NotFound(StoreError, KeyError):
    pass


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists (if_absent) or changed since it was read (if_match)."""


class Store(ABC):
    url: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write atomically. With if_absent, write only if the key does not exist; return
        whether this call wrote it (a conditional write: two racing writers, one winner)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raise NotFound if missing."""

    @abstractmethod
    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """All keys under prefix (recursive), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Idempotent."""

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def size(self, key: str) -> int:
        return len(self.get_bytes(key))

    # Versioned reads and compare-and-swap writes (the job record and the controller lease). An
    # etag is opaque: the S3/Azure ETag, the GCS generation, a content hash for a folder.

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object and its etag. Raise NotFound if missing."""
        raise StoreError(f"{type(self).__name__} has no versioned reads")

    def put_versioned(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """Write only if the key is absent (if_absent) or still has etag `if_match`; return the new
        etag. Raise PreconditionFailed when the condition does not hold (the service decides:
        of two racing writers with the same condition, exactly one succeeds)."""
        raise StoreError(f"{type(self).__name__} has no conditional writes")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


COPY_BUFFER = 8 * 1024 * 1024


def _private_dirs(path: Path) -> None:
    """mkdir -p with every folder it creates 0700 (Path.mkdir gives the parents the umask's mode)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass


class LocalStore(Store):
    """A directory. Writes go to a temp file in the same folder, are fsynced, then renamed."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"store {self.url}: cannot create the folder: {e.strerror or e}") from None

    def _path(self, key: str) -> Path:
        key = key.strip("/")
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StoreError(f"key escapes the store: {key!r}")
        return path

    def _write(self, key: str, writer: Callable[[object], None], *, if_absent: bool = False) -> bool:
        dest = self._path(key)
        for again in (True, False):  # a delete may remove the emptied folder in between: once more
            _private_dirs(dest.parent)
            try:
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)  # 0600: objects are private
                break
            except FileNotFoundError:
                if not again:
                    raise
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, dest)  # atomic create-if-absent
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, dest)
            _fsync_dir(dest.parent)
            return True
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        return self._write(key, lambda f: f.write(data), if_absent=if_absent)  # type: ignore[attr-defined]

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(key) from None

    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        def copy(dst: object) -> None:
            with open(path, "rb") as src:
                for chunk in iter(lambda: src.read(COPY_BUFFER), b""):
                    dst.write(chunk)  # type: ignore[attr-defined]
                    if progress:
                        progress(len(chunk))

        self._write(key, copy)

    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(key)
        path = Path(path)
        _private_dirs(path.parent)
        tmp = path.with_name(f".tmp-{path.name}")
        with open(src, "rb") as s, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as d:
            for chunk in iter(lambda: s.read(COPY_BUFFER), b""):
                d.write(chunk)
                if progress:
                    progress(len(chunk))
        os.replace(tmp, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _walk(self, base: Path) -> Iterator[str]:
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                yield Path(dirpath, name).relative_to(self.root).as_posix()

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.lstrip("/")
        base = self._path(prefix.rsplit("/", 1)[0] if "/" in prefix else "")
        if not base.exists():
            return []
        return sorted(k for k in self._walk(base) if k.startswith(prefix))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        # like an object store, no empty "folders" are left behind (e.g. pruned checkpoint steps)
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:  # not empty (or racing a writer that just made it): stop here
                break
            parent = parent.parent

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            super().delete_prefix(prefix)

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(key) from None

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)  # a rename makes every write atomic: no lock needed to read
        return data, _content_etag(data)

    def put_versioned(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """Compare-and-swap under an exclusive flock of the store's lock file (shared by every
        process on this file system); the etag is the content's sha256."""
        import fcntl

        lock_path = self.root / ".tmp-cas.lock"  # `.tmp-` names are never listed
        with open(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600), "rb") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                try:
                    current: str | None = _content_etag(self._path(key).read_bytes())
                except (FileNotFoundError, IsADirectoryError):
                    current = None
                if if_absent and current is not None:
                    raise PreconditionFailed(f"{key} exists")
                if if_match is not None and current != if_match:
                    raise PreconditionFailed(f"{key} changed")
                self._write(key, lambda f: f.write(data))  # type: ignore[attr-defined]
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return _content_etag(data)


def _content_etag(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def open_store(url: str) -> Store:
    """file:///path (or a plain path), s3://bucket/prefix, gs://bucket/prefix, az://container/prefix."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStore(parsed.path if parsed.scheme else url)
    from spotrun.clouds import load_class, store_classes

    stores = store_classes()
    try:
        target = stores[parsed.scheme]
    except KeyError:
        schemes = ", ".join(f"{s}://" for s in ("file", *stores))
        raise StoreError(f"unsupported store URL {url!r}: use {schemes}") from None
    return load_class(target).from_url(url)


def object_name(prefix: str, key: str) -> str:
    """The object name of `key` under a bucket prefix (S3, GCS, Azure Blob). Refuses empty,
    '.' and '..' segments, so a key can never reach outside the store's prefix."""
    key = key.strip("/")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise StoreError(f"bad store key {key!r}")
    return f"{prefix}/{key}" if prefix else key


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"
