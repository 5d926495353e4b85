"""Trace loaders: every format in shared/data, each with its own 0/1 convention."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from spotrun.simulate.traces import (
    TraceFormatError,
    ZoneTrace,
    detect_format,
    load_trace,
    load_traces,
    region_of,
)

DATA = Path(os.environ.get("SPOTRUN_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not present")


# ----------------------------------------------------------------------------- hand-made files


def test_skypilot_json_counts_and_nodes(tmp_path: Path) -> None:
    f = tmp_path / "us-west-2a_v100_1.json"
    f.write_text(json.dumps({"metadata": {"gap_seconds": 300}, "data": [0, 1, 16, 3]}))
    assert detect_format(f) == "skypilot"
    (z,) = load_trace(f)
    assert (z.name, z.instance, z.region, z.gap_seconds) == ("us-west-2a", "v100_1", "us-west-2", 300)
    assert z.available == [False, True, True, True]  # value = instances obtained; 1 node needed
    assert load_trace(f, nodes=16)[0].available == [False, False, True, False]
    assert z.with_nodes(3).available == [False, False, True, True]
    assert z.duration_seconds == 1200


def test_skypilot_preemption_trace_with_prices_keeps_counts(tmp_path: Path) -> None:
    """A `prices` key does not make a trace SkyNomad's: SkyPilot preemption traces carry prices
    and still store instance counts (1 = one instance obtained, not "preempted")."""
    f = tmp_path / "us-east-1a_v100_1.json"
    f.write_text(json.dumps({"metadata": {"gap_seconds": 600}, "data": [1, 0, 2, 1], "prices": [0.9, 0.9, 1.1, 1.0]}))
    assert detect_format(f) == "skypilot"
    (z,) = load_trace(f)
    assert z.available == [True, False, True, True]
    assert z.prices == [0.9, 0.9, 1.1, 1.0] and z.capacity == [1, 0, 2, 1]
    assert load_trace(f, nodes=2)[0].available == [False, False, True, False]
    bad = tmp_path / "us-east-1b_v100_1.json"
    bad.write_text(json.dumps({"metadata": {"gap_seconds": 600}, "data": [1, 0], "prices": [0.9]}))
    with pytest.raises(TraceFormatError, match="'prices' has 1 ticks"):
        load_trace(bad)


def test_skynomad_json_is_preempted_convention_and_flags_gap(tmp_path: Path) -> None:
    f = tmp_path / "us-east4-a_h100_16.json"
    f.write_text(
        json.dumps(
            {
                "metadata": {
                    "gap_seconds": 600,
                    "start_time": "2025-10-04T00:10:00+00:00",
                    "zone": "us-east4-a",
                    "price_info": {"price": 14.8, "on_demand_price": 82.5},
                    "gap_filled": {"gap_start_index": 1, "gap_end_index": 2},
                },
                "data": [0, 1, 1, 0],
                "prices": [14.8] * 4,
            }
        )
    )
    assert detect_format(f) == "skynomad"
    (z,) = load_trace(f)
    assert z.available == [True, False, False, True]  # 1 = preempted / unavailable
    assert z.filled == [False, True, True, False]
    assert z.ondemand_price == 82.5 and z.prices == [14.8] * 4
    assert z.start == datetime(2025, 10, 4, 0, 10, tzinfo=UTC)
    assert z.availability() == 1.0  # observed ticks only
    assert z.availability(observed_only=False) == 0.5


def test_skypilot_raw_csv_one_means_launch_failed(tmp_path: Path) -> None:
    f = tmp_path / "us-west-2b_k80_1.csv"
    f.write_text("0,2022-10-26T22:05:04.000Z,0\n1,2022-10-26T22:15:04.000Z,1\n2,2022-10-26T22:25:05.000Z,0\n")
    assert detect_format(f) == "skypilot-raw"
    (z,) = load_trace(f)
    assert z.available == [True, False, True]
    assert z.gap_seconds == 600 and z.name == "us-west-2b"


def test_skynomad_probes_threshold(tmp_path: Path) -> None:
    f = tmp_path / "probes.csv"
    f.write_text(
        "run_id,scheduled_at,zone,instances_requested,instances_created,capacity_exhausted_detected,"
        "gpu_spot_price_usd_per_hour\n"
        "a,2025-10-03T17:10:00-07:00,us-east4-a,16,0,1,\n"
        "a,2025-10-03T17:10:00-07:00,us-west1-b,16,16,0,2.5\n"
        "b,2025-10-03T17:20:00-07:00,us-east4-a,16,9,1,3.0\n"
        "b,2025-10-03T17:20:00-07:00,us-west1-b,16,4,1,2.5\n"
    )
    zones = {z.name: z for z in load_trace(f)}
    assert zones["us-east4-a"].available == [False, True]
    assert zones["us-east4-a"].prices == [3.0, 3.0]  # the missing head is back-filled
    assert zones["us-west1-b"].available == [True, True]
    strict = {z.name: z for z in load_trace(f, nodes=8)}
    assert strict["us-west1-b"].available == [True, False]
    assert zones["us-east4-a"].start == datetime(2025, 10, 4, 0, 10, tzinfo=UTC)


def test_bamboo_events_become_a_node_count(tmp_path: Path) -> None:
    f = tmp_path / "p3-trace.csv"
    f.write_text("0,add,n1\r\n0,add,n2\r\n90000,remove,n1\r\n150000,add,n3\r\n")
    assert detect_format(f) == "bamboo-events"
    (z,) = load_trace(f, nodes=2)
    # ticks of 60 s: [0,60) 2 nodes; [60,120) loses n1 at 90 s -> min 1; [120,180) 1 then 2
    assert z.capacity == [2, 1, 1]
    assert z.available == [True, False, False]


def test_bamboo_gcloud_sorts_and_names_zone(tmp_path: Path) -> None:
    f = tmp_path / "v100x1-east1c.csv"
    f.write_text("2021-12-10, 13:07:45, 80\n2021-12-10, 13:09:45, 70\n2021-12-10, 13:08:45, 75\n")
    (z,) = load_trace(f, nodes=75)
    assert z.name == "us-east1-c" and z.instance == "v100x1"
    assert z.capacity == [80, 75, 70]
    assert z.available == [True, True, False]


def test_bamboo_doc_seconds_and_hours_agree(tmp_path: Path) -> None:
    secs = tmp_path / "aws-spot-instances-g4dn-xlarge-us-east-1c-2020-11-20.csv"
    secs.write_text("0,0\n120,0\n120,4\n360,4\n")
    hours = tmp_path / "aws-spot-instances-g4dn-xlarge-us-east-1c-2020-11-20_scaled.csv"
    hours.write_text("0.000,0\n0.0333,0\n0.0333,4\n0.1,4\n")
    a, b = load_trace(secs, nodes=4)[0], load_trace(hours, nodes=4)[0]
    assert a.name == "us-east-1c" and a.instance == "g4dn.xlarge"
    assert a.available == b.available == [False, False, True, True, True, True, True]


def test_price_history_is_always_available(tmp_path: Path) -> None:
    f = tmp_path / "history.csv"
    f.write_text(
        "Timestamp,AvailabilityZone,InstanceType,ProductDescription,SpotPrice\n"
        "2020-01-01T00:00:00.000Z,us-east-1a,p3.2xlarge,Linux/UNIX,1.0\n"
        "2020-01-01T00:00:00.000Z,us-east-1b,p3.2xlarge,Linux/UNIX,2.0\n"
        "2020-01-01T02:30:00.000Z,us-east-1a,p3.2xlarge,Linux/UNIX,1.5\n"
    )
    zones = {z.name: z for z in load_trace(f)}
    a = zones["us-east-1a"]
    assert a.available == [True, True, True]  # hourly ticks 0h, 1h, 2h
    assert a.prices == [1.0, 1.0, 1.0] and a.price_at(3 * 3600) == 1.0  # change at 2:30 falls after 2h
    assert zones["us-east-1b"].prices == [2.0, 2.0, 2.0]


def test_available_at_clamps_and_regions() -> None:
    z = ZoneTrace("us-east4-b", "test", 600.0, [True, False])
    assert z.available_at(0) and not z.available_at(600) and not z.available_at(10**6)
    assert z.available_at(-5)
    assert region_of("us-west-2a") == "us-west-2"
    assert region_of("europe-west3-c") == "europe-west3"
    assert region_of("eastus") == "eastus"
    assert z.window(1).available == [False]


def test_unknown_and_malformed_files(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("hello,world,again,and,more\n")
    with pytest.raises(TraceFormatError):
        load_trace(f)
    g = tmp_path / "y.json"
    g.write_text(json.dumps({"no": "data"}))
    with pytest.raises(TraceFormatError):
        load_trace(g)
    with pytest.raises(ValueError):
        ZoneTrace("z", "t", 60.0, [True], prices=[1.0, 2.0])


# ----------------------------------------------------------------------------- the real files


@needs_data
def test_skypilot_json_equals_inverted_raw_log() -> None:
    """PROVENANCE: the 2022-10-26 JSON availability equals 1 - fail of the raw logs, every tick."""
    jdir = DATA / "skypilot_spot_traces/availability/1-node/aws-10-26-2022"
    rdir = DATA / "skypilot_spot_strategy_raw/2022-10-26T22-05"
    for jf in sorted(jdir.glob("*.json")):
        (a,) = load_trace(jf)
        (b,) = load_trace(rdir / f"{jf.stem}.csv")
        assert a.ticks == b.ticks == 3895
        assert a.available == b.available, jf.name
        assert b.gap_seconds == 600
        assert b.start == datetime(2022, 10, 26, 22, 5, 4, tzinfo=UTC)


@needs_data
def test_skynomad_facts() -> None:
    zones = load_traces([DATA / "skynomad/gcp_h100_16_traces"])
    assert len(zones) == 13 and all(z.ticks == 2114 and z.gap_seconds == 600 for z in zones)
    assert all(z.filled is not None and sum(z.filled) == 60 and z.filled[696] and z.filled[755] for z in zones)
    assert all(z.ondemand_price and z.prices for z in zones)
    raw = json.loads((DATA / "skynomad/gcp_h100_16_traces/us-west1-b_h100_16.json").read_text())["data"]
    west = next(z for z in zones if z.name == "us-west1-b")
    assert west.available == [v == 0 for v in raw]
    probes = load_trace(DATA / "skynomad/gcp_h100_spot_probes.csv")
    assert len(probes) == 13 and {z.ticks for z in probes} == {2104}
    overall = sum(sum(z.available) for z in probes) / sum(z.ticks for z in probes)
    assert overall == pytest.approx(0.7671, abs=5e-5)  # PROVENANCE / data/README: 76.7%


@needs_data
def test_bamboo_facts() -> None:
    (p3,) = load_trace(DATA / "bamboo_traces/p3-trace.csv")
    (g4,) = load_trace(DATA / "bamboo_traces/g4dn-trace.csv")
    assert max(p3.capacity or []) == 32 and max(g4.capacity or []) == 24
    assert p3.duration_seconds / 3600 == pytest.approx(11.37, abs=0.02)
    assert g4.duration_seconds / 3600 == pytest.approx(10.77, abs=0.02)
    (a100,) = load_trace(DATA / "bamboo_traces/gcloud/a100x1-east1b.csv")
    assert (min(a100.capacity or []), max(a100.capacity or [])) == (17, 64)
    doc = DATA / "bamboo_traces/doc_data"
    stem = "aws-spot-instances-g4dn-xlarge-us-east-1c-2020-11-20-1930-to-2020-11-21-2200"
    a, b = load_trace(doc / f"{stem}.csv")[0], load_trace(doc / f"{stem}_scaled.csv")[0]
    assert a.name == "us-east-1c"
    assert sum(x != y for x, y in zip(a.capacity or [], b.capacity or [], strict=False)) <= 2  # rounding
    (single,) = load_trace(doc / "aws-spot-instances-p2-xlarge-us-east-1a-2020-11-20-1730-to-2020-11-21-1104.csv")
    assert single.capacity == [8]


@needs_data
def test_price_history_files() -> None:
    zones = load_trace(DATA / "training_on_a_dime/aws_p2_p3_spot_price_history_2020.csv")
    assert all(all(z.available) for z in zones)
    assert {z.instance for z in zones} >= {"p3.2xlarge", "p2.xlarge"}
    first = next(z for z in zones if z.name == "eu-west-1c" and z.instance == "p3.16xlarge")
    assert first.prices is not None and first.prices[0] == 26.44  # the file's first row
    gcp = load_trace(DATA / "gcp_price_history_cyclenerd/gcp_gpu_vm_price_changes.csv")
    a2 = next(z for z in gcp if z.name == "us-east1" and z.instance == "a2-highgpu-1g")
    assert a2.ondemand_price and a2.prices and a2.prices[-1] < a2.ondemand_price
