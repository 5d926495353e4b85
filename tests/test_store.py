import threading

import pytest

from spotrun.clouds.store import LocalStore, NotFound, StoreError, open_store


def test_put_get_list_delete(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_bytes("jobs/j/a.txt", b"A")
    store.put_bytes("jobs/j/sub/b.txt", b"B")
    store.put_bytes("jobs/k/c.txt", b"C")
    assert store.get_bytes("jobs/j/a.txt") == b"A"
    assert store.list("jobs/j/") == ["jobs/j/a.txt", "jobs/j/sub/b.txt"]
    assert store.list("jobs/") == ["jobs/j/a.txt", "jobs/j/sub/b.txt", "jobs/k/c.txt"]
    assert store.list("nothing/") == []
    store.delete("jobs/j/a.txt")
    store.delete("jobs/j/a.txt")
    assert not store.exists("jobs/j/a.txt")
    with pytest.raises(NotFound):
        store.get_bytes("jobs/j/a.txt")
    store.delete_prefix("jobs/j")
    assert store.list("jobs/") == ["jobs/k/c.txt"]


def test_files_roundtrip_with_progress(tmp_path):
    store = LocalStore(tmp_path / "s")
    src = tmp_path / "big.bin"
    src.write_bytes(b"x" * (20 * 1024 * 1024 + 3))
    seen = []
    store.put_file("blob", src, progress=seen.append)
    assert sum(seen) == src.stat().st_size and len(seen) >= 3
    dst = tmp_path / "out" / "copy.bin"
    store.get_file("blob", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert store.size("blob") == src.stat().st_size


def test_no_temp_files_left_and_none_listed(tmp_path):
    store = LocalStore(tmp_path / "s")
    (tmp_path / "s" / "d").mkdir(parents=True)
    (tmp_path / "s" / "d" / ".tmp-abc").write_bytes(b"half")  # a writer that died mid-write
    store.put_bytes("d/x", b"1")
    assert store.list("d/") == ["d/x"]


def test_if_absent_has_exactly_one_winner(tmp_path):
    store = LocalStore(tmp_path / "s")
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        results.append(store.put_bytes("lock", str(i).encode(), if_absent=True))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert store.get_bytes("lock").decode() in {str(i) for i in range(8)}


def test_keys_cannot_escape_the_root(tmp_path):
    store = LocalStore(tmp_path / "s")
    with pytest.raises(StoreError):
        store.put_bytes("../outside", b"x")


def test_open_store_by_url(tmp_path):
    assert isinstance(open_store(str(tmp_path / "a")), LocalStore)
    assert isinstance(open_store((tmp_path / "b").as_uri()), LocalStore)
    with pytest.raises(StoreError, match="unsupported store URL"):
        open_store("ftp://x/y")


def test_the_local_store_keeps_the_same_contract_as_the_bucket_stores(tmp_path):
    from tests.fakes import store_contract as contract

    root = tmp_path / "s"
    contract.check_put_get_exists_size_delete(LocalStore(root / "a"))
    contract.check_list_is_recursive_sorted_relative(LocalStore(root / "b"))
    work = tmp_path / "work"
    work.mkdir()
    contract.check_large_file_round_trip(LocalStore(root / "c"), work, 9 * 1024 * 1024 + 123)
    empty = tmp_path / "empty"
    empty.mkdir()
    contract.check_get_file_missing(LocalStore(root / "d"), empty)
    contract.check_if_absent_writes_once(LocalStore(root / "e"))
    contract.check_if_absent_race(lambda: LocalStore(root / "f"))
