"""The Store contract, as checks any cloud store's tests run against their emulator.

Each function takes a fresh, empty store (rooted at a prefix of a fresh bucket/container) and
asserts one part of what `spotrun.clouds.store.Store` promises the controller and the Agent.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from spotrun.clouds.store import NotFound, Store, StoreError


def check_put_get_exists_size_delete(store: Store) -> None:
    assert not store.exists("jobs/j1/job.json")
    store.put_bytes("jobs/j1/job.json", b'{"a": 1}')
    assert store.exists("jobs/j1/job.json")
    assert store.get_bytes("jobs/j1/job.json") == b'{"a": 1}'
    assert store.size("jobs/j1/job.json") == 8
    store.put_bytes("jobs/j1/job.json", b"{}")  # plain puts overwrite
    assert store.get_bytes("jobs/j1/job.json") == b"{}"
    store.delete("jobs/j1/job.json")
    store.delete("jobs/j1/job.json")  # idempotent
    with pytest.raises(NotFound):
        store.get_bytes("jobs/j1/job.json")
    with pytest.raises(NotFound):
        store.size("jobs/j1/job.json")
    with pytest.raises(StoreError):
        store.put_bytes("jobs/../../escape", b"x")


def check_list_is_recursive_sorted_relative(store: Store) -> None:
    for key in ["jobs/j1/b", "jobs/j1/a/x", "jobs/j10/c", "jobs/j2/d"]:
        store.put_bytes(key, b"-")
    assert store.list("jobs/j1/") == ["jobs/j1/a/x", "jobs/j1/b"]
    assert store.list("jobs/j1") == ["jobs/j1/a/x", "jobs/j1/b", "jobs/j10/c"]  # a prefix, as LocalStore
    assert store.list("") == ["jobs/j1/a/x", "jobs/j1/b", "jobs/j10/c", "jobs/j2/d"]
    assert store.list("nothing/") == []
    store.delete_prefix("jobs/j1/")
    assert store.list("") == ["jobs/j10/c", "jobs/j2/d"]


def check_large_file_round_trip(store: Store, tmp_path: Path, size: int) -> None:
    """A file above the chunking threshold goes up and comes back bit for bit, with progress."""
    src = tmp_path / "model.pt"
    data = os.urandom(size)
    src.write_bytes(data)
    moved: list[int] = []
    store.put_file("jobs/j1/checkpoints/000000000010/model.pt", src, progress=moved.append)
    assert sum(moved) == len(data)
    assert store.size("jobs/j1/checkpoints/000000000010/model.pt") == len(data)
    dest = tmp_path / "back" / "model.pt"
    got: list[int] = []
    store.get_file("jobs/j1/checkpoints/000000000010/model.pt", dest, progress=got.append)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert sum(got) == len(data)
    assert [p.name for p in dest.parent.iterdir()] == ["model.pt"]  # no temp file left


def check_get_file_missing(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        store.get_file("missing", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def check_if_absent_writes_once(store: Store) -> None:
    assert store.put_bytes("jobs/j1/attempts/1/exit", b'{"code": 0}', if_absent=True) is True
    assert store.put_bytes("jobs/j1/attempts/1/exit", b'{"code": 9}', if_absent=True) is False
    assert store.get_bytes("jobs/j1/attempts/1/exit") == b'{"code": 0}'


def check_if_absent_race(make_store: Callable[[], Store], rounds: int = 3, writers: int = 4) -> None:
    """Racing writers through separate clients: the service decides, exactly one wins."""
    stores = [make_store() for _ in range(writers)]
    for s in stores:
        s.exists("warm-up")  # build each client before the race starts
    for r in range(rounds):
        key = f"race/{r}"
        barrier = threading.Barrier(writers)
        results: dict[int, bool] = {}

        def write(i: int, key: str = key, barrier: threading.Barrier = barrier, results: dict = results) -> None:
            barrier.wait()
            results[i] = stores[i].put_bytes(key, f"writer {i}".encode(), if_absent=True)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, won in results.items() if won]
        assert len(results) == writers
        assert len(winners) == 1, results
        assert stores[0].get_bytes(key) == f"writer {winners[0]}".encode()
