"""Each policy's decisions on small hand-made markets."""

from __future__ import annotations

import math
import random

import pytest

from spotrun.policies import POLICIES, make_policy
from spotrun.policies.base import Decision, Observation, Policy, ZoneView, ondemand_needed, slack_h
from spotrun.policies.observe import Outcome, ZoneFacts, observe_job
from spotrun.policies.spotrun_policy import SpotrunPolicy
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
    # t=0: spot a is tried and has no capacity; at 0.01 h it is behind the line (0 < ep):
    # on-demand. It cannot see spot come back while on on-demand, so it never leaves on a guess
    # (which would drop it to waiting and pay the restart again): on-demand to the end.
    assert runs(r) == [("ondemand", "a", 0.01, 4.26)]
    assert r.deadline_met and r.failed_launches == 1
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


def test_spotrun_tries_zones_without_recent_trouble_first() -> None:
    """Preempted in a, capacity unknown everywhere: b (no trouble seen) before a, at one price."""
    zones = [ZoneView("a", "r", 1.0, 3.0, None), ZoneView("b", "r", 1.0, 3.0, None)]
    hist = (Outcome("launched", "a", True, 0.0), Outcome("preempted", "a", True, 2.0))
    assert make_policy("spotrun").decide(obs(now_h=2.0, work_done_h=2.0, zones=zones, history=hist)) == (
        Decision.spot("b")
    )
    assert make_policy("greedy").decide(obs(now_h=2.0, work_done_h=2.0, zones=zones, history=hist)) == (
        Decision.spot("a")
    )
    # a zone whose launch just found no capacity is skipped by everyone
    fresh = observe_job(
        now_h=2.0,
        work_done_h=2.0,
        work_total_h=10.0,
        deadline_h=20.0,
        restart_overhead_h=0.5,
        current=None,
        zones=[ZoneFacts("a", "r", 0.5, 3.0), ZoneFacts("b", "r", 1.0, 3.0)],
        history=[Outcome("no_capacity", "a", True, 2.0)],
        step_h=1.0,
    )
    assert [z.available for z in fresh.zones] == [False, None]
    assert make_policy("spotrun").decide(fresh) == Decision.spot("b")


def test_spotrun_price_aware_back_off_when_asked_to() -> None:
    """By default a zone that just preempted the job goes after every other zone, whatever its
    price. With ``flap_loss_p`` (an option: it ignores the slack a lost relaunch spends) it goes
    after zones of about the same price only: one dearer by more than the expected extra restart
    spread over the remaining work (0.5 x 0.5 h / 8 h = 3%) goes after it."""
    hist = (Outcome("launched", "a", True, 0.0), Outcome("preempted", "a", True, 2.0))

    def pick(b_price: float, policy: SpotrunPolicy) -> Decision:
        zones = [ZoneView("a", "r", 1.0, 3.0, None), ZoneView("b", "r", b_price, 3.0, None)]
        return policy.decide(obs(now_h=2.0, work_done_h=2.0, zones=zones, history=hist))

    assert pick(1.02, SpotrunPolicy(flap_loss_p=0.5)) == Decision.spot("b")
    assert pick(1.05, SpotrunPolicy(flap_loss_p=0.5)) == Decision.spot("a")
    assert pick(1.5, SpotrunPolicy(flap_loss_p=0.5)) == Decision.spot("a")
    assert pick(1.5, SpotrunPolicy()) == Decision.spot("b")  # the default: behind every zone
    # past backoff_h the preemption is forgotten: the cheapest again
    zones = [ZoneView("a", "r", 1.0, 3.0, None), ZoneView("b", "r", 1.5, 3.0, None)]
    late = obs(now_h=4.5, work_done_h=2.0, zones=zones, history=hist)
    assert make_policy("spotrun").decide(late) == Decision.spot("a")


def test_spotrun_slack_aware_back_off_when_asked_to() -> None:
    """With ``flap_slack_weight`` a lost relaunch also costs its share of the slack left, priced at
    what running out costs (on-demand instead of spot): with 0.5 h of slack left a flapping zone
    goes behind one 50% dearer; with 9.5 h it does not."""
    hist = (Outcome("launched", "a", True, 0.0), Outcome("preempted", "a", True, 2.0))
    zones = [ZoneView("a", "r", 1.0, 3.0, None), ZoneView("b", "r", 1.5, 3.0, None)]

    def pick(deadline_h: float) -> Decision:
        p = SpotrunPolicy(flap_loss_p=0.5, flap_slack_weight=1.0)
        return p.decide(obs(now_h=2.0, work_done_h=2.0, deadline_h=deadline_h, step_h=0.25, zones=zones, history=hist))

    assert pick(11.0) == Decision.spot("b")
    assert pick(20.0) == Decision.spot("a")


def test_spotrun_restart_aware_floor_keeps_spot_greedy_bails() -> None:
    """Slack 0.3 h, a 0.25 h restart, 0.25 h decisions: after the launch's overhead the slack
    (0.05 h) is below one decision step. Greedy's floor then leaves spot for on-demand; spotrun
    credits the progress a running spot instance makes until the next decision (its work is
    saved on the notice) and finishes on spot, still safe."""
    m = Market.simple({"a": "1" * 30}, spot=1.0, ondemand=3.0, gap_h=0.25)
    job = JobModel(4.0, 4.55, restart_overhead_h=0.25)
    s, g = run(make_policy("spotrun"), m, job), run(make_policy("greedy"), m, job)
    assert [x.kind for x in s.timeline] == ["spot"] and s.deadline_met
    assert [x.kind for x in g.timeline] == ["spot", "ondemand"] and g.deadline_met
    assert s.cost < 0.5 * g.cost
    # Without a notice-time save the work at risk is real: no credit, on-demand.
    nosave = JobModel(4.0, 4.55, restart_overhead_h=0.25, notice_save=False, checkpoint_interval_h=0.5)
    r = run(make_policy("spotrun"), m, nosave)
    assert r.deadline_met and r.ondemand_hours > 0


def test_spotrun_goes_on_demand_rather_than_launch_spot_it_cannot_keep() -> None:
    """With less slack than a launch's overhead, a spot launch would be stopped by the floor
    before it made progress: spotrun goes to on-demand at once (greedy pays for the try)."""
    m = Market.simple({"a": "1" * 30}, spot=1.0, ondemand=3.0, gap_h=0.25)
    job = JobModel(4.0, 4.45, restart_overhead_h=0.25)  # slack 0.2 < one launch's 0.25
    s, g = run(make_policy("spotrun"), m, job), run(make_policy("greedy"), m, job)
    assert [x.kind for x in s.timeline] == ["ondemand"] and s.deadline_met
    assert s.cost <= g.cost


def test_spotrun_launch_after_a_failed_one_needs_one_restart_of_slack() -> None:
    """Slack 0.3 h, a 0.25 h restart: one spot launch fits. The first zone has no capacity; the
    failed launch takes 36 s, shortening the step to the next decision. The launch in the second
    zone still spends only 0.25 h of slack (it used to be rounded up to two shortened steps, 0.48 h,
    and the job went to on-demand)."""
    m = Market.simple({"a": "0" * 30, "b": "1" * 30}, spot=1.0, ondemand=3.0, gap_h=0.25)
    job = JobModel(4.0, 4.55, restart_overhead_h=0.25)
    s = run(make_policy("spotrun"), m, job)
    assert s.failed_launches == 1 and [(x.kind, x.zone) for x in s.timeline] == [("spot", "b")]
    assert s.deadline_met and s.ondemand_hours == 0


def test_spotrun_bridges_and_returns_when_asked_to() -> None:
    """Bridging on on-demand and returning to spot (off by default: it cost more on the tuning
    traces) works as described when enabled."""
    m = Market.simple({"a": "00000000" + "1" * 60}, spot=1.0, ondemand=3.0, gap_h=0.25)
    job = JobModel(8.0, 10.5, restart_overhead_h=0.25)
    p = SpotrunPolicy(bridge_launches=3.0, retry_h=1.0, return_gain=1.0)
    s = run(p, m, job)
    assert [x.kind for x in s.timeline] == ["ondemand", "spot"] and s.deadline_met


def test_spotrun_moves_for_a_real_price_gain_only_when_asked_to() -> None:
    """Moving a running job to a zone that became much cheaper (off by default: a move into a zone
    of unknown capacity cost more than it saved on the tuning traces)."""
    m = Market.simple({"a": "1" * 30, "b": "1" * 30}, spot={"a": 1.0, "b": 1.0}, gap_h=0.5)
    m.spot_price[1] = [1.0] * 4 + [0.3] * 26  # b gets much cheaper at 2 h
    job = JobModel(8.0, 14.0, restart_overhead_h=0.25)
    s = run(SpotrunPolicy(move_gain=0.5), m, job)
    assert [x.zone for x in s.timeline] == ["a", "b"]
    assert s.cost < run(make_policy("greedy"), m, job).cost
    assert [x.zone for x in run(make_policy("spotrun"), m, job).timeline] == ["a"]  # the default stays
    m = Market.simple({"a": "1" * 30, "b": "1" * 30}, spot={"a": 1.0, "b": 1.0}, gap_h=0.5)
    m.spot_price[1] = [1.0] * 4 + [0.9] * 26  # a 10% gain does not pay a restart's risk
    assert [x.zone for x in run(SpotrunPolicy(move_gain=0.5), m, job).timeline] == ["a"]


def test_spotrun_with_unknown_capacity_tries_the_cheapest_zone() -> None:
    """The controller does not know capacity: the policy still picks a zone to try."""
    p = make_policy("spotrun")
    o = obs(zones=[ZoneView("a", "r", 2.0, 3.0, None), ZoneView("b", "r", 1.0, 3.0, None)])
    assert p.decide(o) == Decision.spot("b")


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


# ----------------------------------------------------------------------------- the controller's side


def _attempt(n: int, key: str, *, spot: bool, started: float | None, ended: float, reason: str, detail: str = ""):
    from spotrun.control.state import Attempt, AttemptStatus

    return Attempt(
        job_id="j",
        n=n,
        status=AttemptStatus.ENDED,
        provider="local",
        region="r",
        zone=key,
        instance_type="t",
        spot=spot,
        offer_key=key,
        hourly_price=1.0,
        ondemand_price=3.0,
        time_scale=1.0,
        client_token=f"tok{n}",
        instance_id=None,
        instance=None,
        created_at=started if started is not None else ended,
        started_at=started,
        ended_at=ended if started is not None else None,
        end_reason=reason,
        exit_code=None,
        detail=detail,
        cost=0.0,
        store_url=None,
    )


def test_the_controller_builds_the_same_history_and_hides_trace_measured_rates() -> None:
    """control/decide.py turns attempts in State into the observation model's outcomes, and an
    interruption rate measured over the replayed trace never reaches the policy."""
    import dataclasses

    from spotrun.catalog.model import Offer
    from spotrun.control.decide import job_history, observation
    from spotrun.planner import Candidate

    attempts = [
        _attempt(1, "local/a/t", spot=True, started=0.0, ended=3600.0, reason="preempted"),
        _attempt(
            2, "local/b/t", spot=True, started=None, ended=3700.0, reason="launch_failed", detail="NoCapacity: none"
        ),
        _attempt(
            3, "local/c/t", spot=True, started=None, ended=3710.0, reason="launch_failed", detail="QuotaExceeded: x"
        ),
        _attempt(4, "local/a/t", spot=False, started=3720.0, ended=7200.0, reason="switched"),
    ]
    hist = job_history(attempts, lambda t: t / 3600.0)
    assert [(o.kind, o.zone, o.spot) for o in hist] == [
        ("launched", "local/a/t", True),
        ("preempted", "local/a/t", True),
        ("no_capacity", "local/b/t", True),  # a quota error says nothing about capacity
        ("launched", "local/a/t", False),
        ("stopped", "local/a/t", False),
    ]

    def cand(zone: str, source: str) -> Candidate:
        offer = Offer("local", "r", zone, "t", "A100", 1, 40.0, 4, 16, 1.0, 3.0, 0.5, interruption_source=source)
        fields = {f.name: None for f in dataclasses.fields(Candidate)}
        fields.update(
            offer=offer, spot=True, hourly_price=1.0, expected_hours=2.0, expected_preemptions=0.0, expected_cost=2.0,
            breakdown={}, finish_hours=2.0, meets_deadline=True, within_budget=True, base_hours=2.0,
            hours_lost_per_preemption=0.1,
        )  # fmt: skip
        return Candidate(**fields)

    obs = observation(
        [cand("a", "trace"), cand("b", "market")],
        now_h=1.03,
        progress=0.5,
        deadline_h=None,
        current=None,
        cooling=set(),
        history=hist[:3],
        step_h=0.1,
    )
    by = {z.key: z for z in obs.zones}
    assert by["local/a/t"].interruption_rate is None and by["local/b/t"].interruption_rate == 0.5
    assert by["local/b/t"].available is False and by["local/a/t"].available is None
    assert obs.history == tuple(hist[:3])
