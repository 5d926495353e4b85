"""The Store on Google Cloud Storage: `GCSStore.from_url("gs://bucket/prefix")`.

google-cloud-storage is imported on the first request. Credentials are Application Default
Credentials (on a GCE VM: its service account, which is how the Agent gets access without any
secret in its startup script). `STORAGE_EMULATOR_HOST` (e.g. `http://127.0.0.1:4443`) points the
client at an emulator with anonymous credentials, as the library itself does.

Ordering ("manifest written last"): an upload returns once GCS has finalized the whole object
(one request, or the last chunk of a resumable upload: an object never becomes visible in part),
and GCS is strongly consistent for reads and listings after a write, so a reader who sees
`MANIFEST.json` sees every file uploaded before it.

Conditional writes (`if_absent=True`) use `ifGenerationMatch=0`: "only if no live object has this
name", decided by GCS itself, so of two racing writers exactly one wins (the other gets 412).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from spotrun.clouds.store import NotFound, PreconditionFailed, Progress, Store, StoreError, object_name

MiB = 1024 * 1024
RESUMABLE_THRESHOLD = 8 * MiB  # larger files go up in resumable chunks of this size
CHUNK_SIZE = 8 * MiB  # a multiple of 256 KiB, as GCS requires


class _Counting:
    """A file wrapper that reports every byte that passes through it to `progress`."""

    def __init__(self, f: BinaryIO, progress: Progress | None) -> None:
        self._f = f
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data and self._progress:
            self._progress(len(data))
        return data

    def write(self, data: bytes) -> int:
        written = self._f.write(data)
        if self._progress:
            self._progress(len(data))
        return written

    def __getattr__(self, name: str) -> Any:  # seek, tell, flush ... from the real file
        return getattr(self._f, name)


class GCSStore(Store):
    """Keys live under `gs://<bucket>/<prefix>/`; `list` returns keys relative to it."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None, project: str | None = None) -> None:
        if not bucket:
            raise StoreError("a GCS store needs a bucket: gs://<bucket>/<prefix>")
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self._client = client
        self._project = project
        self._bucket: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> GCSStore:
        parsed = urlparse(url)
        if parsed.scheme != "gs":
            raise StoreError(f"not a GCS URL: {url!r} (expected gs://bucket/prefix)")
        return cls(parsed.netloc, parsed.path, **options)

    # ------------------------------------------------------------------ plumbing

    @property
    def bucket(self) -> Any:
        with self._lock:
            if self._bucket is None:
                if self._client is None:
                    self._client = self._make_client()
                self._bucket = self._client.bucket(self.bucket_name)
            return self._bucket

    def _make_client(self) -> Any:
        from google.cloud import storage

        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        project = self._project or os.environ.get("GOOGLE_CLOUD_PROJECT")
        if emulator:
            from google.auth.credentials import AnonymousCredentials

            return storage.Client(
                project=project or "spotrun-emulator",
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": emulator},
            )
        try:
            return storage.Client(project=project)
        except Exception as e:  # google.auth.exceptions.DefaultCredentialsError
            raise StoreError(
                "no Google Cloud credentials for the GCS store (run `gcloud auth application-default login`, "
                f"set GOOGLE_APPLICATION_CREDENTIALS, or run on a VM with a service account): {e}"
            ) from None

    def _name(self, key: str) -> str:
        return object_name(self.prefix, key)

    def _call(self, what: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one storage call; failures become StoreError/NotFound."""
        from google.api_core import exceptions as gexc

        try:
            return fn(*args, **kwargs)
        except gexc.NotFound as e:
            if what in ("put", "upload", "list"):  # nothing to miss but the bucket itself
                raise StoreError(f"GCS bucket {self.bucket_name!r} not found: {e.message}") from None
            raise NotFound(key) from None
        except gexc.GoogleAPICallError as e:
            raise StoreError(f"GCS {what} gs://{self.bucket_name}/{self._name(key)} failed: {e.message}") from None
        except Exception as e:
            from google.auth import exceptions as authexc

            if isinstance(e, authexc.GoogleAuthError):
                raise StoreError(f"GCS {what}: Google credentials rejected: {e}") from None
            raise

    # ------------------------------------------------------------------ Store

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(self._name(key))
        if not if_absent:
            self._call("put", key, blob.upload_from_string, data, content_type="application/octet-stream")
            return True
        try:
            blob.upload_from_string(data, content_type="application/octet-stream", if_generation_match=0)
        except gexc.PreconditionFailed:
            return False
        except gexc.GoogleAPICallError:
            self._call("put", key, blob.upload_from_string, data, if_generation_match=0)  # translate
        return True

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The etag is the object's generation (the download reports the one it read)."""
        blob = self.bucket.blob(self._name(key))
        data = self._call("get", key, blob.download_as_bytes)
        return data, str(blob.generation)

    def put_versioned(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """`ifGenerationMatch` (0: no live object): GCS answers 412 to the loser of a race."""
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(self._name(key))
        generation = 0 if if_absent else (int(if_match) if if_match is not None else None)
        try:
            blob.upload_from_string(data, content_type="application/octet-stream", if_generation_match=generation)
        except gexc.PreconditionFailed:
            raise PreconditionFailed(key) from None
        except gexc.GoogleAPICallError as e:
            self._call("put", key, _reraise, e)  # translate
        return str(blob.generation)

    def get_bytes(self, key: str) -> bytes:
        return self._call("get", key, self.bucket.blob(self._name(key)).download_as_bytes)

    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        size = Path(path).stat().st_size
        blob = self.bucket.blob(self._name(key), chunk_size=CHUNK_SIZE if size >= RESUMABLE_THRESHOLD else None)
        with open(path, "rb") as f:
            self._call(
                "upload",
                key,
                blob.upload_from_file,
                _Counting(f, progress),
                size=size,
                content_type="application/octet-stream",
            )

    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        path = Path(path)
        blob = self.bucket.blob(self._name(key), chunk_size=CHUNK_SIZE)
        tmp = path.with_name(f".tmp-{path.name}")
        try:
            self._call("head", key, blob.reload)  # NotFound before any local file is made
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                self._call("download", key, blob.download_to_file, _Counting(f, progress))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def exists(self, key: str) -> bool:
        return bool(self._call("head", key, self.bucket.blob(self._name(key)).exists))

    def size(self, key: str) -> int:
        blob = self._call("head", key, self.bucket.get_blob, self._name(key))
        if blob is None:
            raise NotFound(key)
        return int(blob.size)

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.lstrip("/")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        names = self._call("list", prefix, lambda: [b.name for b in self.bucket.list_blobs(prefix=full)])
        return sorted(name[strip:] for name in names)

    def delete(self, key: str) -> None:
        try:
            self._call("delete", key, self.bucket.blob(self._name(key)).delete)
        except NotFound:
            pass


def _reraise(exc: Exception) -> None:
    raise exc
