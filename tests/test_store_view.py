"""`status/wait/logs/cancel JOB --store URL` take what the local commands take: the job id, or a
unique prefix of it (ids begin with the job's name, so a unique name works too)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from spotrun.clouds.store import open_store
from spotrun.control.durable.record import publish
from spotrun.control.durable.remote import NoRecord, StoreView
from spotrun.control.state import State


def test_a_job_is_found_in_the_store_by_its_id_or_a_unique_prefix(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    store = open_store(url)
    state = State(tmp_path / "state.db")
    for job_id in ("train-1206-aaaa11", "train-1206-bbbb22", "eval-1206-cccc33"):
        state.create_job(job_id, job_id.split("-")[0], {}, url, time.time(), None)
        publish(state, store, job_id)
    assert StoreView(url, "eval-1206-cccc33").job_id == "eval-1206-cccc33"
    assert StoreView(url, "eval").job_id == "eval-1206-cccc33"  # the name, while it is unique
    assert StoreView(url, "train-1206-b").job().id == "train-1206-bbbb22"
    with pytest.raises(NoRecord, match=r"'train' matches 2 jobs .*train-1206-aaaa11, train-1206-bbbb22"):
        StoreView(url, "train")
    for bad in ("nope", "", "../x", "train/.."):
        with pytest.raises(NoRecord, match="no job"):
            StoreView(url, bad)
