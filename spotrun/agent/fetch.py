"""What the Agent brings to the instance before the workload starts: code bundle and data."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from spotrun.agent.jobfile import DataItem
from spotrun.bundle import sha256_file, unpack
from spotrun.clouds.store import Store, open_store


def fetch_bundle(store: Store, key: str, work: Path, tmp: Path) -> None:
    """Download the code bundle, check it against the sha256 in its name, unpack into `work`."""
    local = tmp / "bundle.tar.gz"
    store.get_file(key, local)
    expected = Path(key).name.removesuffix(".tar.gz")
    if len(expected) == 64 and sha256_file(local) != expected:
        raise ValueError(f"code bundle {key} does not match its sha256")
    unpack(local, work)
    local.unlink()


def fetch_store_data(store: Store, key: str, dest: Path, tmp: Path) -> Path:
    """A data archive made by `spotrun.bundle.pack_path`, placed at `dest`."""
    local = tmp / "data.tar.gz"
    store.get_file(key, local)
    try:
        return unpack(local, dest)
    finally:
        local.unlink()


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
