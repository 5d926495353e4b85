"""Each policy's decisions on small hand-made markets."""

from __future__ import annotations

import math
import random

import pytest

from spotrun.policies import POLICIES, make_policy
from spotrun.policies.base import Decision, Observation, Policy, ZoneView, ondemand_needed, slack_h
from spotrun.policies.spotrun_policy import SpotrunPolicy, ondemand_share
from spotrun.simulate.engine import SimResult, run
from spotrun.simulate.model import JobModel, Market


def runs(res: SimResult) -> list[tuple[str, str, float, float]]:
    return [(s.kind, s.zone, round(s.start_h, 3), round(s.end_h, 3)) for s in res.timeline]


def obs(**kw: object) -> Observation:
    base: dict = dict(
        now_h=0.0,
        work_done_h=0.0,
        work_total_h=10.0,
        deadline_h=20.0,
        restart_overhead_h=0.5,
        current=None,
        step_h=1.0,
        zones=[ZoneView("a", "r", 1.0, 3.0, True)],
    )
    base.update(kw)
    return Observation(**base)


def test_registry_and_protocol() -> None:
    assert set(POLICIES) == {"on-demand", "greedy", "failover", "uniform-progress", "spotrun"}
    for name in POLICIES:
        p = make_policy(name)
        assert isinstance(p, Policy) and p.name == name
        assert p is not make_policy(name)  # fresh state per job
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("yolo")
    with pytest.raises(ValueError):
        Decision("spot")  # a spot decision needs a zone


def test_slack_and_the_ondemand_floor() -> None:
    o = obs(now_h=8.0, work_done_h=2.0)  # 12 h left, 8 h of work + 0.5 h restart
    assert slack_h(o) == pytest.approx(3.5)
    assert not ondemand_needed(o)
    assert ondemand_needed(obs(now_h=10.6, work_done_h=2.0))  # slack 0.9 < one step
    # work at risk counts as lost in the worst case
    assert slack_h(obs(now_h=8.0, work_done_h=2.0, work_at_risk_h=1.0)) == pytest.approx(2.5)
    # already on on-demand: no restart to pay
    od = obs(now_h=8.0, work_done_h=2.0, current=Decision.ondemand("a"))
    assert slack_h(od) == pytest.approx(4.0)
    assert slack_h(obs(deadline_h=None)) == math.inf


def test_on_demand_policy() -> None:
    m = Market.simple({"a": "1111"}, spot=1.0, ondemand=3.0)
    r = run(make_policy("on-demand"), m, JobModel(2.0, 5.0, restart_overhead_h=0.25))
    assert runs(r) == [("ondemand", "a", 0.0, 2.25)]
    assert r.cost == pytest.approx(3.0 * 2.25) and r.cost_ratio == pytest.approx(1.0)


def test_greedy_waits_then_spot() -> None:
    m = Market.simple({"a": "0011111111"})
    r = run(make_policy("greedy"), m, JobModel(3.0, 7.0, restart_overhead_h=0.25))
    # slack at t = 0, 1, 2: 3.75, 2.75, 1.75 (>= one step): wait, wait, spot
    assert runs(r) == [("spot", "a", 2.0, 5.25)]
    assert r.deadline_met and r.cost == pytest.approx(3.25)


def test_greedy_forced_to_ondemand_stays_there() -> None:
    m = Market.simple({"a": "0011111"})
    r = run(make_policy("greedy"), m, JobModel(3.0, 5.0, restart_overhead_h=0.25))
    # t=0: slack 1.75 >= 1 step: wait; t=1: slack 0.75 < 1: on-demand, even after spot returns
    assert runs(r) == [("ondemand", "a", 1.0, 4.25)]
    assert r.deadline_met


def test_greedy_takes_the_cheapest_zone() -> None:
    m = Market.simple({"a": "1111", "b": "1111"}, spot={"a": 2.0, "b": 1.0})
    r = run(make_policy("greedy"), m, JobModel(2.0, 4.0, restart_overhead_h=0.0))
    assert runs(r) == [("spot", "b", 0.0, 2.0)]


def test_failover_retries_same_region_first() -> None:
    m = Market.simple(
        {"us-west-2a": "11001111", "us-east-1a": "11110000", "us-east-1b": "11111111"},
        spot={"us-west-2a": 0.5, "us-east-1a": 1.0, "us-east-1b": 1.0},
    )
    job = JobModel(7.0, 20.0, restart_overhead_h=0.0)
    r = run(make_policy("failover"), m, job)
    # cheapest first; preempted at 2 -> no other zone in us-west-2 -> cheapest anywhere (us-east-1a);
    # preempted at 4 -> stays in us-east-1 (us-east-1b) though us-west-2a is cheaper again
    assert [s[:2] for s in runs(r)] == [("spot", "us-west-2a"), ("spot", "us-east-1a"), ("spot", "us-east-1b")]
    assert r.preemptions == 2 and r.zone_moves == 2
    g = run(make_policy("greedy"), m, job)
    assert [s[1] for s in runs(g)] == ["us-west-2a", "us-east-1a", "us-west-2a"]


def test_failover_never_uses_ondemand_and_can_miss() -> None:
    m = Market.simple({"a": "0000000011"})
    job = JobModel(2.0, 4.0, restart_overhead_h=0.25)
    r = run(make_policy("failover"), m, job)
    assert r.ondemand_hours == 0 and not r.deadline_met and not r.forced_finish
    assert r.completion_h == pytest.approx(10.25)
    assert run(make_policy("greedy"), m, job).deadline_met
    # past cap_factor x deadline the engine finishes on on-demand, and says so
    capped = run(make_policy("failover"), m, job, cap_factor=1.5)
    assert capped.forced_finish and capped.timeline[-1].end == "forced"


def test_uniform_progress_rules() -> None:
    m = Market.simple({"a": "000111111111"})
    job = JobModel(4.0, 8.0, restart_overhead_h=0.25)  # ep(t) = t / 2
    r = run(make_policy("uniform-progress"), m, job)
    # t=0 idle, on the line: wait. t=1 behind (0 < 0.5): on-demand. Hysteresis: stay until
    # cp >= ep(t + 2d): at t=3 cp=1.75 = ep(3.5): leave for spot, which is there.
    assert runs(r)[:2] == [("ondemand", "a", 1.0, 3.0), ("spot", "a", 3.0, 5.5)]
    assert r.deadline_met
    # the safety net: idle with time left < remaining + 2d -> on-demand to the end
    up = make_policy("uniform-progress")
    d = up.decide(
        obs(
            now_h=8.8,
            work_done_h=0.0,
            deadline_h=20.0,
            restart_overhead_h=0.5,
            zones=[ZoneView("a", "r", 1.0, 3.0, False)],
            work_total_h=10.0,
            step_h=0.1,
        )
    )
    assert d.kind == "ondemand"


def test_uniform_progress_sticks_to_one_zone() -> None:
    m = Market.simple({"a": "1100000000", "b": "1111111111"}, spot={"a": 0.5, "b": 1.0})
    r = run(make_policy("uniform-progress"), m, JobModel(4.0, 8.0, restart_overhead_h=0.0))
    assert {s.zone for s in r.timeline if s.kind == "spot"} == {"a"}


def test_spotrun_avoids_the_zone_that_flaps() -> None:
    # 24 ticks of history: "a" flaps, "b" is steady; same price. From tick 24 "a" keeps flapping.
    m = Market.simple({"a": "10" * 12 + "1101101101101101", "b": "1" * 40}, gap_h=0.25)
    job = JobModel(3.0, 6.0, restart_overhead_h=0.25)
    s = run(make_policy("spotrun"), m, job, start_tick=24)
    g = run(make_policy("greedy"), m, job, start_tick=24)
    assert [x.zone for x in s.timeline] == ["b"] and s.preemptions == 0
    assert g.preemptions > 0 and s.cost < g.cost


def test_spotrun_bridges_on_ondemand_and_comes_back() -> None:
    m = Market.simple({"a": "000000" + "1" * 40}, spot=1.0, ondemand=3.0, gap_h=0.25)
    job = JobModel(6.0, 7.5, restart_overhead_h=0.25)
    s = run(make_policy("spotrun"), m, job)
    g = run(make_policy("greedy"), m, job)
    assert [x.kind for x in s.timeline] == ["ondemand", "spot"]
    assert [x.kind for x in g.timeline] == ["ondemand"]  # forced at slack 0, never returns
    assert s.deadline_met and g.deadline_met and s.cost < 0.6 * g.cost


def test_spotrun_moves_for_a_real_price_gain_only() -> None:
    m = Market.simple({"a": "1" * 30, "b": "00" + "1" * 28}, spot={"a": 1.0, "b": 0.5}, gap_h=0.5)
    job = JobModel(8.0, 14.0, restart_overhead_h=0.25)
    s = run(make_policy("spotrun"), m, job)
    assert [x.zone for x in s.timeline] == ["a", "b"]
    assert s.cost < run(make_policy("greedy"), m, job).cost
    same = Market.simple({"a": "1" * 30, "b": "00" + "1" * 28}, gap_h=0.5)
    assert [x.zone for x in run(make_policy("spotrun"), same, job).timeline] == ["a"]


def test_spotrun_learns_from_preemptions_and_failed_launches() -> None:
    p = SpotrunPolicy()
    z = ZoneView("a", "r", 1.0, 3.0, None)
    before = p.hazard(z, 0.0)
    p.observe(0.0, [ZoneView("a", "r", 1.0, 3.0, True)])
    p.on_preempted("a", 0.5)
    p.observe(1.0, [ZoneView("a", "r", 1.0, 3.0, True)])
    p.on_preempted("a", 1.2)
    assert p.hazard(z, 1.2) > before
    p.on_launch_failed("b", 2.0)
    assert p.stats["b"].last is False


def test_spotrun_with_unknown_capacity_tries_a_zone() -> None:
    """The controller may not know capacity (no probe): the policy still picks a zone to try."""
    p = make_policy("spotrun")
    o = obs(zones=[ZoneView("a", "r", 2.0, 3.0, None), ZoneView("b", "r", 1.0, 3.0, None)])
    assert p.decide(o) == Decision.spot("b")


def test_ondemand_share_matches_the_erlang_integral() -> None:
    """E[(W - T_n)+] for T_n ~ Erlang(n, lam), checked by integrating the Erlang CDF numerically."""
    for lam, w, k in ((0.3, 10.0, 2), (1.2, 4.0, 0), (0.05, 48.0, 5)):
        n = k + 1
        steps = 20000
        dt = w / steps
        integral = 0.0
        for i in range(steps):
            t = (i + 0.5) * dt
            term, cdf_below = math.exp(-lam * t), 0.0
            for j in range(n):
                cdf_below += term
                term *= lam * t / (j + 1)
            integral += (1.0 - cdf_below) * dt
        share, p_need = ondemand_share(lam, w, k)
        assert share == pytest.approx(integral, rel=1e-3, abs=1e-6)
        assert 0.0 <= p_need <= 1.0
    assert ondemand_share(0.0, 10.0, 0) == (0.0, 0.0)
    assert ondemand_share(1.0, 10.0, 1000)[0] == pytest.approx(0.0, abs=1e-9)


def test_every_deadline_aware_policy_meets_feasible_deadlines() -> None:
    rng = random.Random(7)
    for _ in range(40):
        pattern = {z: "".join("1" if rng.random() < 0.6 else "0" for _ in range(60)) for z in ("a", "b")}
        m = Market.simple(pattern, gap_h=0.25)
        w = rng.choice([2.0, 4.0, 6.0])
        job = JobModel(
            w, w * rng.choice([1.05, 1.2, 1.5, 2.0]) + 0.25, restart_overhead_h=0.25, notice_save=rng.random() < 0.5
        )
        for name in ("on-demand", "greedy", "uniform-progress", "spotrun"):
            assert run(make_policy(name), m, job).deadline_met, (name, pattern, job)


def test_without_a_deadline_policies_only_use_spot() -> None:
    m = Market.simple({"a": "0011100111" * 4, "b": "1100011000" * 4}, spot={"a": 1.0, "b": 1.2})
    job = JobModel(6.0, None, restart_overhead_h=0.25)
    for name in ("greedy", "failover", "uniform-progress", "spotrun"):
        r = run(make_policy(name), m, job)
        assert r.deadline_met and r.ondemand_hours == 0 and not r.forced_finish, name
