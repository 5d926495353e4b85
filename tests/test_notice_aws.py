"""AWSNotice (IMDSv2 spot instance-action + rebalance) against the fake metadata service."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from spotrun.agent.notice import make_watcher
from spotrun.clock import FakeClock
from spotrun.clouds.aws.notice import AWSNotice
from tests.fakes.imds import FakeIMDS


@pytest.fixture
def imds() -> Iterator[FakeIMDS]:
    with FakeIMDS(instance_id="i-abc", zone="us-east-1b") as fake:
        yield fake


def test_no_notice_until_announced(imds: FakeIMDS) -> None:
    watcher = AWSNotice(endpoint=imds.url)
    assert watcher.check() is None
    assert watcher.check() is None
    # IMDSv2: one token PUT, then GETs carrying it
    assert [m for m, _ in imds.requests].count("PUT") == 1
    assert ("GET", "/latest/meta-data/spot/instance-action") in imds.requests


def test_instance_action_gives_seconds_left(imds: FakeIMDS) -> None:
    watcher = AWSNotice(endpoint=imds.url)
    when = imds.announce_interruption(seconds=120)
    left = watcher.check()
    assert left is not None
    assert abs(left - (int(when) - time.time())) < 2.0  # the time is whole seconds, as on EC2
    assert 115 < left <= 120


def test_seconds_left_never_negative() -> None:
    with FakeIMDS() as imds:
        imds.announce_interruption(seconds=30)
        clock = FakeClock(start=time.time() + 3600)  # long past the announced time
        assert AWSNotice(endpoint=imds.url, clock=clock).check() == 0.0


def test_rebalance_is_an_early_warning(imds: FakeIMDS) -> None:
    watcher = AWSNotice(endpoint=imds.url, rebalance_seconds=600)
    imds.recommend_rebalance()
    assert watcher.check() == 600
    imds.announce_interruption(seconds=100)  # the real notice, when it comes, is nearer: it wins
    left = watcher.check()
    assert left is not None and left <= 100


def test_token_is_renewed_when_imds_rejects_it(imds: FakeIMDS) -> None:
    watcher = AWSNotice(endpoint=imds.url)
    assert watcher.check() is None
    imds.expire_tokens()
    imds.announce_interruption(seconds=120)
    assert watcher.check() is not None
    assert [m for m, _ in imds.requests].count("PUT") == 2


def test_token_is_renewed_before_its_ttl_runs_out(imds: FakeIMDS) -> None:
    clock = FakeClock(start=time.time())
    watcher = AWSNotice(endpoint=imds.url, token_ttl=600, clock=clock)
    watcher.check()
    clock.advance(500)  # within the TTL, but past the renewal point (TTL - 60 s)
    watcher.check()
    assert [m for m, _ in imds.requests].count("PUT") == 2


def test_unreachable_imds_is_no_notice() -> None:
    imds = FakeIMDS()
    url = imds.url
    imds.close()
    started = time.monotonic()
    assert AWSNotice(endpoint=url, timeout=0.5).check() is None
    assert time.monotonic() - started < 2


def test_registry_builds_it_from_the_boot_notice(imds: FakeIMDS) -> None:
    watcher = make_watcher({"kind": "aws", "endpoint": imds.url, "poll_interval": 0.5})
    assert isinstance(watcher, AWSNotice)
    assert watcher.poll_interval == 0.5
    imds.announce_interruption(seconds=60)
    assert watcher.check() is not None
