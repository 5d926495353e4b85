"""The Store on Azure Blob Storage: `AzureBlobStore.from_url("az://container/prefix")`.

azure-storage-blob is imported on the first request. Which storage account, and how to sign in:

1. `AZURE_STORAGE_CONNECTION_STRING` (developer machines, CI with Azurite);
2. otherwise the account from the URL (`az://container@account/prefix`) or from
   `AZURE_STORAGE_ACCOUNT_URL` / `AZURE_STORAGE_ACCOUNT`, signed in with `DefaultAzureCredential`
   (on an Azure VM: its managed identity, so no secret ever travels in the VM's custom data).

A connection string holds the account key: it is never logged, stored or put in a boot record.

Ordering ("manifest written last"): `upload_blob` returns once the blob is committed (one Put Blob,
or Put Block List for large files: uncommitted blocks are invisible), and Blob Storage is strongly
consistent, so a reader who sees `MANIFEST.json` sees every file uploaded before it.

Conditional writes (`if_absent=True`) send `If-None-Match: *`: the service decides, one racing
writer gets 201, the others 409 BlobAlreadyExists.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from spotrun.clouds.store import NotFound, PreconditionFailed, Progress, Store, StoreError, object_name

CONCURRENCY = 4
MiB = 1024 * 1024
# Files above 8 MiB go up as 8 MiB blocks (committed at once by Put Block List) and come down in
# 8 MiB ranges, CONCURRENCY at a time: checkpoints of GBs move in parallel.
TRANSFER_OPTIONS = {
    "max_single_put_size": 8 * MiB,
    "max_block_size": 8 * MiB,
    "max_single_get_size": 8 * MiB,
    "max_chunk_get_size": 8 * MiB,
}


def _hook(progress: Progress | None) -> Any:
    """azure-storage-blob reports (bytes so far, total); the Store contract wants deltas."""
    if progress is None:
        return None
    seen = [0]

    def hook(current: int, _total: int | None) -> None:
        if current > seen[0]:
            progress(current - seen[0])
            seen[0] = current

    return hook


class AzureBlobStore(Store):
    """Keys live under `az://<container>/<prefix>/`; `list` returns keys relative to it."""

    def __init__(self, container: str, prefix: str = "", *, account: str | None = None, service: Any = None) -> None:
        if not container:
            raise StoreError("an Azure Blob store needs a container: az://<container>/<prefix>")
        self.container_name = container
        self.account = account
        self.prefix = prefix.strip("/")
        where = f"{container}@{account}" if account else container
        self.url = f"az://{where}/{self.prefix}" if self.prefix else f"az://{where}"
        self._service = service
        self._container: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AzureBlobStore:
        parsed = urlparse(url)
        if parsed.scheme != "az":
            raise StoreError(f"not an Azure Blob URL: {url!r} (expected az://container/prefix)")
        container, _, account = parsed.netloc.partition("@")
        return cls(container, parsed.path, account=account or None, **options)

    # ------------------------------------------------------------------ plumbing

    @property
    def container(self) -> Any:
        with self._lock:
            if self._container is None:
                service = self._service or self._make_service()
                self._container = service.get_container_client(self.container_name)
            return self._container

    def _make_service(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if conn and not self.account:
            try:
                return BlobServiceClient.from_connection_string(conn, **TRANSFER_OPTIONS)
            except ValueError:
                raise StoreError("AZURE_STORAGE_CONNECTION_STRING is not a valid connection string") from None
        account_url = os.environ.get("AZURE_STORAGE_ACCOUNT_URL")
        account = self.account or os.environ.get("AZURE_STORAGE_ACCOUNT")
        if self.account or not account_url:
            if not account:
                raise StoreError(
                    "no Azure storage account for the az:// store: set AZURE_STORAGE_CONNECTION_STRING, "
                    "AZURE_STORAGE_ACCOUNT(_URL), or write az://container@account/prefix"
                )
            account_url = f"https://{account}.blob.core.windows.net"
        from azure.identity import DefaultAzureCredential

        return BlobServiceClient(account_url, credential=DefaultAzureCredential(), **TRANSFER_OPTIONS)

    def _name(self, key: str) -> str:
        return object_name(self.prefix, key)

    def _call(self, what: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one blob call; failures become StoreError/NotFound (no URL with a SAS, no key)."""
        from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

        try:
            return fn(*args, **kwargs)
        except ResourceNotFoundError as e:
            if getattr(e, "error_code", "") == "ContainerNotFound":
                raise StoreError(f"Azure container {self.container_name!r} does not exist") from None
            raise NotFound(key) from None
        except ClientAuthenticationError as e:
            raise StoreError(f"Azure Blob {what}: credentials rejected ({getattr(e, 'error_code', '')})") from None
        except HttpResponseError as e:
            code = getattr(e, "error_code", "") or e.status_code
            raise StoreError(f"Azure Blob {what} {self.container_name}/{self._name(key)} failed: {code}") from None

    # ------------------------------------------------------------------ Store

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        from azure.core.exceptions import ResourceExistsError

        if not if_absent:
            self._call("put", key, self.container.upload_blob, self._name(key), data, overwrite=True)
            return True
        container = self.container
        try:
            container.upload_blob(self._name(key), data, overwrite=False)  # If-None-Match: *
        except ResourceExistsError:
            return False
        except Exception as e:
            self._call("put", key, _reraise, e)  # translate
        return True

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        downloader = self._call("get", key, self.container.download_blob, self._name(key))
        return self._call("get", key, downloader.readall), str(downloader.properties.etag)

    def put_versioned(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """`If-None-Match: *` / `If-Match: <etag>`: the service answers 409/412 to the loser of a race."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

        options: dict[str, Any] = {"overwrite": not if_absent}
        if if_match is not None:
            options.update(etag=if_match, match_condition=MatchConditions.IfNotModified)
        try:
            result = self.container.get_blob_client(self._name(key)).upload_blob(data, **options)
        except (ResourceExistsError, ResourceModifiedError) as e:
            raise PreconditionFailed(f"{key}: {getattr(e, 'error_code', '')}") from None
        except ResourceNotFoundError as e:
            if if_match is not None and getattr(e, "error_code", "") != "ContainerNotFound":
                raise PreconditionFailed(f"{key}: gone") from None
            self._call("put", key, _reraise, e)
        except Exception as e:
            self._call("put", key, _reraise, e)  # translate
        return str(result["etag"])  # BlobClient.upload_blob answers the new blob's properties

    def get_bytes(self, key: str) -> bytes:
        downloader = self._call("get", key, self.container.download_blob, self._name(key))
        return self._call("get", key, downloader.readall)

    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            self._call(
                "upload",
                key,
                self.container.upload_blob,
                self._name(key),
                f,
                length=size,
                overwrite=True,
                max_concurrency=CONCURRENCY,
                progress_hook=_hook(progress),
            )

    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".tmp-{path.name}")
        try:
            downloader = self._call(
                "download",
                key,
                self.container.download_blob,
                self._name(key),
                max_concurrency=CONCURRENCY,
                progress_hook=_hook(progress),
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                self._call("download", key, downloader.readinto, f)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def exists(self, key: str) -> bool:
        return bool(self._call("head", key, self.container.get_blob_client(self._name(key)).exists))

    def size(self, key: str) -> int:
        props = self._call("head", key, self.container.get_blob_client(self._name(key)).get_blob_properties)
        return int(props.size)

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.lstrip("/")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        names = self._call("list", prefix, lambda: [b.name for b in self.container.list_blobs(name_starts_with=full)])
        return sorted(name[strip:] for name in names)

    def delete(self, key: str) -> None:
        try:
            self._call("delete", key, self.container.delete_blob, self._name(key))
        except NotFound:
            pass

    def delete_prefix(self, prefix: str) -> None:
        names = [self._name(k) for k in self.list(prefix)]
        for start in range(0, len(names), 256):  # a batch request takes at most 256 sub-requests
            batch = names[start : start + 256]
            try:
                self._call("delete", prefix, self.container.delete_blobs, *batch)
            except StoreError:  # Azurite and some accounts lack blob batch: one by one
                for name in batch:
                    self.delete(name[len(self.prefix) + 1 :] if self.prefix else name)


def _reraise(exc: Exception) -> None:
    raise exc
