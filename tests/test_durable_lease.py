"""Compare-and-swap writes on every store, and the controller lease built on them (issue 16).

Each store kind runs against the real service's client: a folder (flock), S3 through boto3 on
moto's server, Azure Blob through azure-storage-blob on Azurite, GCS through google-cloud-storage
on fake-gcs-server. The races use one client per racer, so the service decides who wins."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from spotrun.clouds.store import NotFound, PreconditionFailed, Store, open_store
from spotrun.control.durable.lease import Holder, Lease, lease_live, read_lease
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

KINDS = ("local", "s3", "azure", "gcs")


@pytest.fixture
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """A factory of separate clients on one fresh, empty store of the kind asked for."""
    kind = request.param
    if kind == "local":
        url = (tmp_path / "store").as_uri()
    elif kind == "s3":
        request.getfixturevalue("aws")
        import boto3

        bucket = unique("lease")
        boto3.client("s3").create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/team"
    elif kind == "azure":
        azurite = request.getfixturevalue("azurite")
        container = unique("lease")
        make_azure_container(azurite, container)
        url = f"az://{container}/team"
    else:
        emulator = request.getfixturevalue("gcs_emulator")
        bucket = unique("lease")
        make_gcs_bucket(emulator, bucket)
        url = f"gs://{bucket}/team"
    return lambda: open_store(url)


@pytest.mark.parametrize("make_store", KINDS, indirect=True)
def test_put_versioned_is_a_compare_and_swap(make_store: Callable[[], Store]) -> None:
    store = make_store()
    with pytest.raises(NotFound):
        store.get_versioned("jobs/j/control/lease.json")
    first = store.put_versioned("jobs/j/control/lease.json", b"one", if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.put_versioned("jobs/j/control/lease.json", b"two", if_absent=True)
    data, etag = store.get_versioned("jobs/j/control/lease.json")
    assert (data, etag) == (b"one", first)
    second = store.put_versioned("jobs/j/control/lease.json", b"two", if_match=first)
    assert second != first
    with pytest.raises(PreconditionFailed):  # a stale etag: someone wrote since
        store.put_versioned("jobs/j/control/lease.json", b"three", if_match=first)
    assert store.get_versioned("jobs/j/control/lease.json") == (b"two", second)
    with pytest.raises(PreconditionFailed):  # if-match on a missing object never creates it
        store.put_versioned("jobs/j/control/other", b"x", if_match=second)
    assert not store.exists("jobs/j/control/other")
    assert store.list("jobs/j/") == ["jobs/j/control/lease.json"]  # no lock or temp file shows


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _race(make_store: Callable[[], Store], seed: int) -> None:
    """Two controllers (two clients, two holders) go for the lease at once, from a seeded start:
    absent, released, expired, or held by a live controller elsewhere. Exactly one may win (none
    when a live one holds it), and the loser's later tries fail while the winner renews."""
    rng = random.Random(seed)
    clock = Clock()
    job = f"job{seed}"
    before = rng.choice(["absent", "released", "expired", "live"])
    old = Lease(make_store(), job, holder=Holder(f"old{seed}", "host-old", 1), ttl=30, clock=clock)
    if before != "absent":
        assert old.acquire()
        if before == "released":
            old.release()
        elif before == "expired":
            clock.now += 31
    racers = [
        Lease(make_store(), job, holder=Holder(f"r{i}-{seed}", f"host-{i}", 1), ttl=30, clock=clock) for i in (0, 1)
    ]
    start = threading.Barrier(2)
    won: list[bool] = [False, False]
    delays = [rng.uniform(0, 0.01) for _ in racers]

    def go(i: int) -> None:
        start.wait()
        threading.Event().wait(delays[i])
        won[i] = racers[i].acquire()

    threads = [threading.Thread(target=go, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if before == "live":
        assert won == [False, False], (seed, before)
        assert old.renew(force=True)
        return
    assert sum(won) == 1, (seed, before, won)
    winner, loser = (racers[0], racers[1]) if won[0] else (racers[1], racers[0])
    assert read_lease(make_store(), job)["holder"] == winner.holder.id  # type: ignore[index]
    assert not loser.acquire()
    clock.now += 5
    assert winner.renew(force=True)
    assert not loser.acquire()
    if before == "expired":
        assert not old.renew(force=True)  # the old holder learns it lost the job and stands down
    # the winner dies; once its lease has expired the loser takes over, and the winner cannot renew
    clock.now += 31
    assert loser.acquire()
    assert not winner.renew(force=True)
    assert lease_live(read_lease(make_store(), job), clock.now, host="elsewhere")


@pytest.mark.parametrize("make_store", ["local", "s3"], indirect=True)
def test_twenty_seeded_races_one_winner_each(make_store: Callable[[], Store]) -> None:
    for seed in range(20):
        _race(make_store, seed)


@pytest.mark.parametrize("make_store", ["azure", "gcs"], indirect=True)
def test_seeded_races_on_azure_and_gcs(make_store: Callable[[], Store]) -> None:
    for seed in range(5):
        _race(make_store, 100 + seed)


def test_a_dead_holder_on_this_host_is_replaced_at_once(tmp_path: Path) -> None:
    """A SIGKILLed controller leaves an unexpired lease; on the same host its dead pid frees it."""
    import socket
    import subprocess
    import sys

    store = open_store((tmp_path / "s").as_uri())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = Lease(store, "j", holder=Holder("gone", socket.gethostname(), int(dead.stdout)), ttl=600)
    assert gone.acquire()
    elsewhere = Lease(store, "j", holder=Holder("x", "another-host", 1), ttl=600)
    assert not elsewhere.acquire()  # another host cannot tell the pid is dead: it waits for expiry
    here = Lease(store, "j", ttl=600)
    assert here.acquire()
    assert json.loads(store.get_bytes("jobs/j/control/lease.json"))["holder"] == here.holder.id


def _claim_race(make_store: Callable[[], Store], tmp_path: Path, seed: int) -> None:
    from spotrun.control.durable.state import DurableState

    rng = random.Random(seed)
    clock = Clock()
    job = f"race{seed}"
    url = make_store().url
    states = []
    for machine in ("b", "c"):
        holder = Holder(f"{machine}{seed}", machine, 1)
        state = DurableState(tmp_path / f"{machine}{seed}.db", holder=holder, ttl=9, clock=clock)
        state.create_job(job, "race", {}, url, clock.now, None)
        states.append(state)
    start = threading.Barrier(2)
    claimed = [False, False]
    delays = [rng.uniform(0, 0.01) for _ in states]

    def claim(i: int) -> None:
        start.wait()
        threading.Event().wait(delays[i])
        claimed[i] = states[i].claim_controller(job, 4242 + i, clock.now, stale_after=30)

    threads = [threading.Thread(target=claim, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(claimed) == 1, (seed, claimed)
    w = claimed.index(True)
    winner, loser = states[w], states[1 - w]
    assert winner.touch_controller(job, 4242 + w, clock.now)
    assert not loser.claim_controller(job, 4242 + (1 - w), clock.now, stale_after=30)
    record = json.loads(make_store().get_bytes(f"jobs/{job}/control/record.json"))
    assert record["job"]["id"] == job  # the winner published the job's record on claiming
    clock.now += 10  # the winner stops checking in; its lease expires
    assert loser.claim_controller(job, 4242 + (1 - w), clock.now, stale_after=30)
    assert not winner.touch_controller(job, 4242 + w, clock.now)  # it learns, and stands down
    for state in states:
        state.close()


@pytest.mark.parametrize("make_store", ["local", "s3"], indirect=True)
def test_twenty_seeded_controller_claims_on_two_machines_one_drives(
    make_store: Callable[[], Store], tmp_path: Path
) -> None:
    """The controller's own claim path (`DurableState.claim_controller`, what `Controller.run`
    calls first), from two machines (two databases, two store clients) at once: exactly one claims
    the job, the other's claim fails (Controller.run raises ControllerBusy), and once the winner
    is gone and its lease expired the other takes over while the winner's check-in fails."""
    seeds = 20 if make_store().url.startswith("file:") else 6  # the store-level races above run 20 on S3
    for seed in range(seeds):
        _claim_race(make_store, tmp_path, seed)


def test_a_busy_owner_keeps_its_lease_through_its_keeper_and_a_stuck_one_loses_it(tmp_path: Path) -> None:
    """The owner does not check in for several TTLs (a long launch or upload on a loaded machine):
    its LeaseKeeper renews, so another machine cannot take the job. An owner stuck past
    `max_stall` gets no renewals: the lease lapses and the other machine takes it; the owner's
    next renewal says so."""
    import time

    from spotrun.control.durable.lease import LeaseKeeper

    store = open_store((tmp_path / "s").as_uri())
    owner = Lease(store, "j", holder=Holder("owner", "host-a", 1), ttl=0.6)
    assert owner.acquire()
    keeper = LeaseKeeper(owner, max_stall=2.0).start()
    other = Lease(open_store(store.url), "j", holder=Holder("other", "host-b", 1), ttl=0.6)
    end = time.monotonic() + 1.8  # three TTLs without a check-in
    while time.monotonic() < end:
        assert not other.acquire()
        time.sleep(0.1)
    assert owner.renew(force=True)
    keeper.beat()
    time.sleep(2.0 + 0.6 + 0.5)  # stuck past max_stall: renewals stop, then the lease expires
    assert other.acquire()
    assert not owner.renew(force=True)
    keeper.stop()


def test_a_replaced_controller_cannot_overwrite_its_successors_record(tmp_path: Path) -> None:
    """Controller B is frozen past its lease; C takes the job over and writes the record. When B
    wakes and changes the job, its record write finds the record changed (If-Match on the etag B
    last wrote): B writes nothing and stops (ControllerBusy); C's record stands."""
    from spotrun.control.durable.record import record_key
    from spotrun.control.durable.state import DurableState
    from spotrun.control.outcome import ControllerBusy

    clock = Clock()
    url = (tmp_path / "store").as_uri()
    store = open_store(url)
    states = {}
    for machine in ("b", "c"):
        state = DurableState(tmp_path / f"{machine}.db", holder=Holder(machine, machine, 1), ttl=9, clock=clock)
        state.create_job("j", "fence", {}, url, clock.now, None)
        states[machine] = state
    b, c = states["b"], states["c"]
    assert b.claim_controller("j", 11, clock.now, stale_after=30)
    b.add_event("j", clock.now, "note", "b drives")
    clock.now += 10  # B is frozen: its lease expires
    assert c.claim_controller("j", 12, clock.now, stale_after=30)
    c.add_event("j", clock.now, "note", "c drives")
    after_c = store.get_bytes(record_key("j"))
    with pytest.raises(ControllerBusy, match="another controller has written its record"):
        b.add_event("j", clock.now, "note", "b wakes up and acts")
    assert store.get_bytes(record_key("j")) == after_c  # nothing of B's reached the store
    b.release_controller("j", 11)  # no error, no write, and C keeps its lease
    assert store.get_bytes(record_key("j")) == after_c
    assert read_lease(store, "j")["holder"] == "c"  # type: ignore[index]
    c.add_event("j", clock.now, "note", "c goes on")  # C's own writes still pass its fence
    assert b"c goes on" in store.get_bytes(record_key("j"))
    for state in states.values():
        state.close()
