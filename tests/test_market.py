"""The local provider's market model: the file format, its errors, and the schedules it produces."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from spotrun.clouds.local.market import (
    Market,
    MarketError,
    load_market,
    parse_market,
    resolve_market_path,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

BASE = """
time_scale: 60
notice: 2
boot: 0.5
seed: 7
zones:
  - zone: a1
    region: ra
    instance_type: t.small
    gpu: T4
    gpu_count: 1
    gpu_memory_gb: 16
    vcpus: 4
    memory_gb: 16
    spot_price: 0.15
    ondemand_price: 0.5
    interruption_rate: 0.6
    preempt_after: [10, 20]
    outages: [[100, 130]]
    capacity: 2
  - {zone: b1, region: rb, instance_type: t.small, vcpus: 4, memory_gb: 16, spot_price: 0.2,
     ondemand_price: 0.5, notice: 0}
"""


def market(text: str = BASE) -> Market:
    return parse_market(textwrap.dedent(text), source="m.yaml")


def error_of(text: str) -> str:
    with pytest.raises(MarketError) as e:
        market(text)
    return str(e.value)


# --------------------------------------------------------------------------- parsing


def test_builtin_markets_load_and_offer_local_rows() -> None:
    for name in ("default", "quickstart"):
        m = load_market(name)
        offers = m.offers()
        assert offers and all(o.provider == "local" and o.interruption_source == "market" for o in offers)
        assert all(o.spot_price is not None and o.ondemand_price is not None for o in offers)
        assert all(o.spot_price < o.ondemand_price for o in offers)  # type: ignore[operator]
        assert len({o.key for o in offers}) == len(offers)
    assert load_market(None).source == load_market("default").source


def test_offers_carry_the_file_figures() -> None:
    a, b = market().offers()
    assert (a.key, a.region, a.gpu, a.gpu_count, a.gpu_memory_gb) == ("local/a1/t.small", "ra", "T4", 1, 16)
    assert (a.spot_price, a.ondemand_price, a.interruption_rate) == (0.15, 0.5, 0.6)
    assert (b.gpu, b.gpu_count, b.interruption_rate) == (None, 0, 0.0)


def test_a_zone_may_offer_several_instance_types() -> None:
    m = market(BASE + "  - {zone: a1, region: ra, instance_type: t.big, vcpus: 8, memory_gb: 32, spot_price: 1}\n")
    assert [o.key for o in m.offers()] == ["local/a1/t.small", "local/b1/t.small", "local/a1/t.big"]
    assert "lists instance type 't.small' twice" in error_of(
        BASE + "  - {zone: a1, region: ra, instance_type: t.small, vcpus: 8, memory_gb: 32, spot_price: 1}\n"
    )


def test_unknown_key_names_file_line_and_allowed_keys() -> None:
    msg = error_of(BASE.replace("    capacity: 2", "    capacity: 2\n    spot_prise: 3"))
    assert "m.yaml:21: zones[0].spot_prise: unknown key" in msg
    assert "spot_price" in msg and "interruption_rate" in msg


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("spot_price: 0.15", "spot_price: -1"),
            "m.yaml:15: zones[0].spot_price: Input should be greater than or equal to 0 (got -1)",
        ),
        (("outages: [[100, 130]]", "outages: [[130, 100]]"), "must end after it starts"),
        (("gpu_count: 1", "gpu_count: 0"), "gpu 'T4' needs gpu_count >= 1"),
        (("time_scale: 60", "time_scale: 0"), "m.yaml:2: time_scale: Input should be greater than 0"),
        (("capacity: 2", "capacity: 0"), "zones[0].capacity"),
        (("preempt_after: [10, 20]", "preempt_after: [10, soon]"), "zones[0].preempt_after[1]"),
        (("    vcpus: 4\n", ""), "zones[0].vcpus: required key is missing"),
    ],
)
def test_invalid_values_are_explained(change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in BASE
    assert expected in error_of(BASE.replace(old, new, 1))


def test_structural_errors() -> None:
    assert "zones: List should have at least 1 item" in error_of("zones: []")
    assert "a market file is a mapping" in error_of("- 1\n- 2")
    assert "m.yaml:3: not valid YAML" in error_of("zones:\n  - {zone: a\n  b: [")
    msg = error_of("zones: [{zone: a, region: r, instance_type: t, vcpus: 1, memory_gb: 1}]")
    assert "m.yaml:1: zones[0]: a zone needs a spot_price, an ondemand_price or a trace with prices" in msg
    msg = error_of("zones: [{zone: a, region: r, instance_type: t, vcpus: 1, memory_gb: 1, spot_price: 1, trace: {}}]")
    assert "exactly one of 'path'" in msg
    with pytest.raises(MarketError, match="built-in markets: default, quickstart"):
        resolve_market_path("no-such-market.yaml")


# --------------------------------------------------------------------------- schedules


def test_preempt_after_is_deterministic_per_launch_then_falls_back_to_the_rate() -> None:
    m = market()
    first = m.schedule("a1/t.small", spot=True, launch_index=0, t=0)
    second = m.schedule("a1/t.small", spot=True, launch_index=1, t=0)
    assert (first.preempt_in, first.cause, first.notice) == (10.5, "preempt_after[0]", 2)  # boot + 10
    assert (second.preempt_in, second.cause) == (20.5, "preempt_after[1]")
    third = [m.schedule("a1/t.small", spot=True, launch_index=k, t=200) for k in range(2, 200)]  # after the outage
    assert all(p.cause == "rate" for p in third)
    # 0.6 per simulated hour at 60x = one per 100 real seconds on average
    mean = sum(p.preempt_in - 0.5 for p in third) / len(third)  # type: ignore[operator]
    assert 70 < mean < 130
    assert third[0] == m.schedule("a1/t.small", spot=True, launch_index=2, t=200)  # same seed, same draw
    other = parse_market(textwrap.dedent(BASE).replace("seed: 7", "seed: 8"))
    assert other.schedule("a1/t.small", spot=True, launch_index=2, t=200) != third[0]


def test_on_demand_and_rate_zero_are_never_preempted() -> None:
    m = market()
    assert m.schedule("a1/t.small", spot=False, launch_index=0, t=0).preempt_in is None
    plan = m.schedule("b1/t.small", spot=True, launch_index=0, t=0)
    assert plan.preempt_in is None and plan.notice == 0  # b1 overrides the notice: killed without one


def test_outage_blocks_launches_and_preempts_running_spot() -> None:
    m = market()
    assert m.unavailable("a1/t.small", 99.9, spot=True) is None
    assert "capacity outage until market time 130s" in (m.unavailable("a1/t.small", 100, spot=True) or "")
    assert m.unavailable("a1/t.small", 110, spot=False) is not None  # no capacity means none at all
    assert m.unavailable("a1/t.small", 130, spot=True) is None
    # launched at t=95 with preempt_after[1] = 20: the outage at 100 comes first
    plan = m.schedule("a1/t.small", spot=True, launch_index=1, t=95)
    assert (plan.preempt_in, plan.cause) == (5, "outage")
    assert "the local market has no 'zz/t.small'" in (m.unavailable("zz/t.small", 0, spot=True) or "")


TRACE = """
time_scale: 60
notice: 1
boot: 0
zones:
  - zone: tz
    region: r
    instance_type: t
    vcpus: 1
    memory_gb: 1
    spot_price: 0.1
    ondemand_price: 0.3
    trace: {available: [1, 1, 0, 0, 1, 1, 1, 0], tick_seconds: 2}
"""


def test_inline_trace_drives_availability_and_preemption() -> None:
    m = market(TRACE)
    pool = "tz/t"
    assert [m.unavailable(pool, t, spot=True) is None for t in (0, 3.9, 4, 7.9, 8, 13.9)] == [
        True,
        True,
        False,
        False,
        True,
        True,
    ]
    assert m.unavailable(pool, 5, spot=False) is None  # the trace is about spot capacity
    assert m.schedule(pool, spot=True, launch_index=0, t=0).preempt_in == 4  # tick 2 is down
    assert m.schedule(pool, spot=True, launch_index=0, t=9).preempt_in == 5  # tick 7 at t=14
    assert m.schedule(pool, spot=True, launch_index=0, t=9).cause == "trace"
    assert not m.pools[pool].replay.available_at(100)  # type: ignore[union-attr]  # the last tick holds
    # 2 drops in 8 ticks of 2 real s = 16 real s = 16 simulated minutes: 7.5 per simulated hour
    assert m.offers()[0].interruption_rate == pytest.approx(7.5)
    assert m.offers()[0].availability == pytest.approx(5 / 8)


def test_trace_loop_start_tick_and_default_tick_length() -> None:
    m = market(TRACE.replace("tick_seconds: 2}", "tick_seconds: 2, loop: true, start_tick: 3}"))
    replay = m.pools["tz/t"].replay
    assert replay is not None
    assert not replay.available_at(0) and replay.available_at(2) and not replay.available_at(8)
    assert replay.available_at(10)  # tick 8 wraps to tick 0
    assert replay.next_unavailable(10) == 14  # tick 10 -> wraps to 2
    m2 = market(TRACE.replace("tick_seconds: 2}", "gap_seconds: 600}"))
    assert m2.pools["tz/t"].replay.tick_seconds == 10  # type: ignore[union-attr]  # 600 s / time_scale 60
    never = market(TRACE.replace("[1, 1, 0, 0, 1, 1, 1, 0]", "[1, 1, 1]"))
    assert never.schedule("tz/t", spot=True, launch_index=0, t=0).preempt_in is None


def test_trace_file_in_a_known_format(tmp_path: Path) -> None:
    """A hand-made Can't-Be-Late JSON file (1 = available) through spotrun.simulate.traces."""
    (tmp_path / "us-x-1a_v100_1.json").write_text(json.dumps({"metadata": {"gap_seconds": 300}, "data": [1, 0, 1, 1]}))
    (tmp_path / "m.yaml").write_text(
        TRACE.replace(
            "trace: {available: [1, 1, 0, 0, 1, 1, 1, 0], tick_seconds: 2}", "trace: {path: us-x-1a_v100_1.json}"
        )
    )
    m = load_market(tmp_path / "m.yaml")
    replay = m.pools["tz/t"].replay
    assert replay is not None and replay.tick_seconds == 5  # 300 s / 60
    assert [m.unavailable("tz/t", t, spot=True) is None for t in (0, 5, 10)] == [True, False, True]
    (tmp_path / "m.yaml").write_text(
        TRACE.replace("available: [1, 1, 0, 0, 1, 1, 1, 0], tick_seconds: 2", "path: nope.json")
    )
    with pytest.raises(MarketError, match="zones\\[0\\].trace: trace file not found"):
        load_market(tmp_path / "m.yaml")


@pytest.mark.skipif(not (DATA / "skynomad").is_dir(), reason="shared data not present")
def test_real_skynomad_trace_with_prices(tmp_path: Path) -> None:
    path = DATA / "skynomad/gcp_h100_16_traces/us-west1-b_h100_16.json"
    (tmp_path / "m.yaml").write_text(
        textwrap.dedent(f"""
        time_scale: 600
        zones:
          - zone: us-west1-b
            region: us-west1
            instance_type: a3-highgpu-8g
            gpu: H100
            gpu_count: 8
            gpu_memory_gb: 80
            vcpus: 208
            memory_gb: 1872
            ondemand_price: 88.25
            trace: {{path: "{path}", nodes: 1}}
    """)
    )
    m = load_market(tmp_path / "m.yaml")
    replay = m.pools["us-west1-b/a3-highgpu-8g"].replay
    assert replay is not None and replay.tick_seconds == 1.0  # 600 s ticks at 600x
    assert replay.prices is not None  # the spot price comes from the trace
    (offer,) = m.offers()
    assert offer.spot_price is not None and 0 < offer.spot_price < 88.25
    assert offer.interruption_rate > 0
    down = [t for t in range(len(replay.available)) if not replay.available_at(t)]
    assert down, "this trace has unavailable ticks"
    t = float(down[0])
    assert m.unavailable(offer.key.removeprefix("local/"), t, spot=True) is not None


def test_quickstart_market_preempts_twice_in_two_zones_then_lets_the_job_finish() -> None:
    m = load_market("quickstart")
    assert len({p.spec.zone for p in m.pools.values()}) >= 2
    for key, pool in m.pools.items():
        assert pool.spec.preempt_after and pool.spec.preempt_after[0] <= 30  # whichever zones come first
        listed = len(pool.spec.preempt_after)
        later = [m.schedule(key, spot=True, launch_index=k, t=0).preempt_in for k in range(listed, listed + 3)]
        assert all(t is None or t > 600 for t in later), (key, later)
