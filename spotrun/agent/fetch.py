"""What the Agent brings to the instance before the workload starts: code bundle and data."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from spotrun.agent.jobfile import DataItem
from spotrun.bundle import UnsafeArchive, sha256_file, unpack
from spotrun.clouds.store import Store, StoreError, open_store

_HEX = set("0123456789abcdef")


class AgentFailure(Exception):
    """What stopped the Agent before the workload could run, and where: `kind` is "store",
    "bundle", "data", "image" or "agent" (the exit record carries it, so the controller tells an
    infrastructure failure from the workload failing)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def sha256_of_key(key: str) -> str:
    """The sha256 a content-addressed key (`.../<sha256>.tar.gz`) names; ValueError otherwise."""
    name = key.rsplit("/", 1)[-1]
    digest = name[: -len(".tar.gz")] if name.endswith(".tar.gz") else ""
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise ValueError(f"{key} is not named by its sha256: refusing to use it unverified")
    return digest


def fetch_verified(store: Store, key: str, local: Path, sha256: str, what: str) -> Path:
    """The one way an instance downloads an archive: to `local`, then checked against `sha256`
    before anything reads it. A mismatch deletes the download and raises AgentFailure(what)."""
    try:
        store.get_file(key, local)
    except (StoreError, OSError) as e:
        raise AgentFailure("store", f"reading {key} from {store.url} failed: {type(e).__name__}: {e}") from e
    got = sha256_file(local)
    if got != sha256:
        local.unlink()
        raise AgentFailure(what, f"{what} {key} does not match its sha256 (got {got[:16]}...): not used")
    return local


def _unpack(local: Path, dest: Path, key: str, what: str) -> Path:
    try:
        return unpack(local, dest)
    except (UnsafeArchive, IsADirectoryError) as e:
        raise AgentFailure(what, f"{what} {key} is unsafe or corrupt: {e}") from e
    finally:
        local.unlink()


def fetch_bundle(store: Store, key: str, work: Path, tmp: Path) -> None:
    """Download the code bundle, check it against the sha256 in its name, unpack into `work`."""
    try:
        digest = sha256_of_key(key)
    except ValueError as e:
        raise AgentFailure("bundle", str(e)) from None
    _unpack(fetch_verified(store, key, tmp / "bundle.tar.gz", digest, "bundle"), work, key, "bundle")


def fetch_store_data(store: Store, key: str, dest: Path, tmp: Path) -> Path:
    """A data archive made by `spotrun.bundle.pack_path` (named by its sha256), placed at `dest`."""
    try:
        digest = sha256_of_key(key)
    except ValueError as e:
        raise AgentFailure("data", str(e)) from None
    return _unpack(fetch_verified(store, key, tmp / "data.tar.gz", digest, "data"), dest, key, "data")


def _split_url(url: str) -> tuple[str, str]:
    """A bucket URI as (URL of the store that holds it, last path segment or '')."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else url)
        return path.parent.as_uri(), path.name
    key = parsed.path.strip("/")
    if not key:
        return url, ""
    parent, _, name = key.rpartition("/")
    return f"{parsed.scheme}://{parsed.netloc}/{parent}".rstrip("/"), name


def fetch_url_data(url: str, dest: Path) -> int:
    """Copy every object under a bucket URI into the folder `dest` (or, if the URI names one
    object, that object to the file `dest`); returns how many objects."""
    base_url, name = _split_url(url)
    store = open_store(base_url)
    prefix = f"{name}/" if name else ""
    keys = store.list(prefix)
    if not keys and name and store.exists(name):
        store.get_file(name, dest)
        return 1
    if not keys:
        raise FileNotFoundError(f"nothing found at {url}")
    for key in keys:
        rel = key[len(prefix) :]
        parts = rel.split("/")
        if ".." in parts or rel.startswith("/"):
            raise ValueError(f"unsafe object name under {url}: {key!r}")
        store.get_file(key, dest / rel)
    return len(keys)


def place_data(store: Store, item: DataItem, dest: Path, tmp: Path) -> None:
    """Place one data entry at `dest` (a folder, or a file for a single-file entry)."""
    if item.kind == "store":
        fetch_store_data(store, item.source, dest, tmp)
    else:
        fetch_url_data(item.source, dest)
