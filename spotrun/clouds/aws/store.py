"""The Store on Amazon S3 (or anything that speaks its API, e.g. moto's server in tests).

`S3Store.from_url("s3://bucket/prefix")`. boto3 is imported only when the first request is made.
The endpoint and credentials come from boto3's usual chain: `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`), environment keys, shared config, and on an EC2 instance its instance
profile -- which is how the Agent gets access without any secret in its user-data.

Ordering ("manifest written last"): every write here returns only once S3 has committed the whole
object (one PUT, or CompleteMultipartUpload for large files: a multipart object becomes visible all
at once, never partially), and nothing is uploaded in the background. S3 is strongly
read-after-write consistent for PUTs, GETs and LISTs, so a writer that uploads the checkpoint files
and only then `MANIFEST.json` guarantees that any reader who sees the manifest sees every file,
complete.

Conditional writes (`if_absent=True`) use S3's `If-None-Match: *` PUT (available on AWS since
2024, and in moto): of two racing writers exactly one gets 200, the other 412 PreconditionFailed.
S3 may answer 409 ConditionalRequestConflict while another conditional write to the same key is in
flight; we retry then, and the retry sees 412 if the other writer won. An S3-compatible server that
answers 501 NotImplemented to the header makes us fall back to HEAD-then-PUT, which is NOT
race-free (documented in docs/providers/aws.md); a server that silently ignores the header cannot be
detected.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from spotrun.clouds.store import NotFound, PreconditionFailed, Progress, Store, StoreError, object_name

MiB = 1024 * 1024
MULTIPART_THRESHOLD = 8 * MiB  # files at or above this size go up in parts
MULTIPART_CHUNKSIZE = 8 * MiB
_CONFLICT_RETRIES = 8
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Store(Store):
    """Keys live under `s3://<bucket>/<prefix>/`; `list` and friends return keys relative to it."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        session: Any = None,
        client: Any = None,
        region: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunksize: int = MULTIPART_CHUNKSIZE,
        max_concurrency: int = 8,
    ) -> None:
        if not bucket:
            raise StoreError("an S3 store needs a bucket: s3://<bucket>/<prefix>")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._session = session
        self._client = client
        self._region = region
        self._threshold = multipart_threshold
        self._chunksize = multipart_chunksize
        self._concurrency = max_concurrency
        self._lock = threading.Lock()
        self._conditional_supported = True

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Store:
        parsed = urlparse(url)
        if parsed.scheme != "s3":
            raise StoreError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        return cls(parsed.netloc, parsed.path, **options)

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from botocore.config import Config

                session = self._session or _shared_session()
                region = self._region or session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
                self._client = session.client(
                    "s3", region_name=region, config=Config(retries={"mode": "standard", "max_attempts": 5})
                )
            return self._client

    def _key(self, key: str) -> str:
        return object_name(self.prefix, key)

    def _call(self, what: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one boto3 call, turning its failures into StoreError/NotFound (never leaking keys)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING_CODES:
                raise NotFound(key) from None
            message = exc.response.get("Error", {}).get("Message", "")
            raise StoreError(f"S3 {what} s3://{self.bucket}/{self._key(key)} failed: {code}: {message}") from None
        except NoCredentialsError:
            raise StoreError(
                "no AWS credentials found for the S3 store (set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, or run on an instance with an instance profile)"
            ) from None
        except BotoCoreError as exc:
            raise StoreError(f"S3 {what} s3://{self.bucket}/{self._key(key)} failed: {exc}") from None

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self._threshold,
            multipart_chunksize=self._chunksize,
            max_concurrency=self._concurrency,
        )

    # ------------------------------------------------------------------ Store

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        full = self._key(key)
        if not if_absent:
            self._call("put", key, self.client.put_object, Bucket=self.bucket, Key=full, Body=data)
            return True
        if not self._conditional_supported:
            return self._put_if_absent_fallback(key, data)
        from botocore.exceptions import ClientError

        for attempt in range(_CONFLICT_RETRIES):
            try:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code = _error_code(exc)
                if code == "PreconditionFailed":
                    return False
                if code == "ConditionalRequestConflict":  # another conditional write in flight
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if code == "NotImplemented":
                    self._conditional_supported = False
                    return self._put_if_absent_fallback(key, data)
                self._call("put", key, _reraise, exc)
        raise StoreError(f"S3 conditional put of s3://{self.bucket}/{full} kept conflicting")

    def _put_if_absent_fallback(self, key: str, data: bytes) -> bool:
        """For S3-compatible servers without conditional PUT: check, then write (racy window)."""
        if self.exists(key):
            return False
        self.put_bytes(key, data)
        return True

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        response = self._call("get", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return self._call("get", key, response["Body"].read), str(response["ETag"])

    def put_versioned(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """`If-None-Match: *` / `If-Match: <etag>` PUTs: S3 answers 412 to the loser of a race."""
        from botocore.exceptions import ClientError

        condition: dict[str, str] = {}
        if if_absent:
            condition["IfNoneMatch"] = "*"
        if if_match is not None:
            condition["IfMatch"] = if_match
        for attempt in range(_CONFLICT_RETRIES):
            try:
                response = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
                return str(response["ETag"])
            except ClientError as exc:
                code = _error_code(exc)
                if code in ("PreconditionFailed", "412") or (if_match is not None and code in _MISSING_CODES):
                    raise PreconditionFailed(f"{key}: {code}") from None
                if code == "ConditionalRequestConflict":
                    time.sleep(0.05 * (attempt + 1))
                    continue
                self._call("put", key, _reraise, exc)
        raise StoreError(f"S3 conditional put of s3://{self.bucket}/{self._key(key)} kept conflicting")

    def get_bytes(self, key: str) -> bytes:
        response = self._call("get", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return self._call("get", key, response["Body"].read)

    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        self._call(
            "upload",
            key,
            self.client.upload_file,
            str(path),
            self.bucket,
            self._key(key),
            Config=self._transfer_config(),
            Callback=progress,
        )

    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        try:
            self._call(
                "download",
                key,
                self.client.download_file,
                self.bucket,
                self._key(key),
                str(tmp),
                Config=self._transfer_config(),
                Callback=progress,
            )
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return False
        return True

    def size(self, key: str) -> int:
        head = self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(head["ContentLength"])

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.lstrip("/")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []

        def walk() -> None:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))

        self._call("list", prefix, walk)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            resp = self._call(
                "delete",
                prefix,
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )
            errors = (resp or {}).get("Errors") or []
            if errors:  # a quiet DeleteObjects answers 200 and lists only the keys it could not delete
                first = errors[0]
                raise StoreError(
                    f"S3 delete of s3://{self.bucket}/{first.get('Key')} failed: {first.get('Code')} "
                    f"({len(errors)} key(s) not deleted)"
                )


_SESSION: list[Any] = []
_SESSION_LOCK = threading.Lock()


def _shared_session() -> Any:
    """One boto3 Session per process for the stores that were not given one (as `boto3.client`
    does): a Session reads botocore's endpoint and service models, ~0.3 s, once."""
    import boto3

    with _SESSION_LOCK:
        if not _SESSION:
            _SESSION.append(boto3.session.Session())
        return _SESSION[0]


def _reraise(exc: Exception) -> None:
    raise exc
