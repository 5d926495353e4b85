"""Discrete-event replay of one job under one policy on a market of zone traces.

Time moves in ticks of the market's grid. At each tick boundary, in this order:

1. a spot instance whose zone has no capacity at this tick is preempted (the work at risk
   is lost unless the notice-time save works) and the policy is told;
2. the policy decides, shown only what the controller would know
   (:func:`spotrun.policies.observe.observe_job`: the job's own attempts, prices, published
   interruption rates; never another zone's capacity). A decision different from what runs
   stops it gracefully (with a checkpoint) and launches the new one. A spot launch into a
   zone without capacity fails as it does for the controller: fast (``failed_launch_h`` of
   unbilled time) and at no cost, and the policy is asked again at once, now knowing it;
3. the tick runs: a fresh instance first pays the restart overhead (billed, no progress),
   then makes progress; periodic checkpoints commit work; billing stops at completion.

A job that has not finished by ``cap_factor`` times its deadline (or work, when there is
no deadline) is finished on on-demand and marked ``forced_finish``: a user would give up
on spot by then, and every policy's cost stays comparable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from spotrun.policies.base import Decision, Policy
from spotrun.policies.observe import Outcome, observe_job
from spotrun.simulate.model import JobModel, Market
from spotrun.simulate.traces import ZoneTrace

EPS = 1e-9


@dataclass(frozen=True)
class Segment:
    """One instance's life: from launch to stop, on spot or on-demand, in a zone."""

    start_h: float
    end_h: float
    kind: str
    zone: str
    end: str  # "preempted" | "stopped" | "finished" | "forced"
    cost: float


@dataclass
class SimResult:
    policy: str
    cost: float
    completion_h: float | None
    deadline_h: float | None
    deadline_met: bool
    preemptions: int
    zone_moves: int
    launches: int
    failed_launches: int
    spot_hours: float
    ondemand_hours: float
    lost_work_h: float
    egress_cost: float
    ondemand_reference: float
    forced_finish: bool = False
    timeline: list[Segment] = field(default_factory=list)
    # The job's outcomes in order: (job hours, launched|no_capacity|preempted|stopped|finished, zone, spot)
    decisions: list[tuple[float, str, str, bool]] = field(default_factory=list)

    @property
    def cost_ratio(self) -> float:
        """Cost ÷ the cost of the same job on on-demand alone."""
        return self.cost / self.ondemand_reference if self.ondemand_reference else float("nan")

    def to_dict(self, *, timeline: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["cost_ratio"] = self.cost_ratio
        if not timeline:
            d.pop("timeline")
            d.pop("decisions")
        return d


def run(
    policy: Policy,
    market: Market,
    job: JobModel,
    *,
    cap_factor: float = 3.0,
    start_tick: int = 0,
) -> SimResult:
    """Replay ``job`` under ``policy`` from tick ``start_tick`` of ``market``.

    The policy sees nothing of the market before ``start_tick``: a real controller has no
    record of other zones' capacity either (spotrun.policies.observe).
    """
    g = market.gap_h
    o = start_tick
    W, D, R = job.work_h, job.deadline_h, job.restart_overhead_h
    horizon_h = cap_factor * (D if D is not None else W + R)
    max_ticks = max(1, int(math.ceil(horizon_h / g)))
    interval = job.checkpoint_interval_h
    Z = len(market.zones)

    work = committed = seg_base = 0.0
    cur: Decision | None = None
    cur_z = -1
    overhead_left = 0.0
    seg_start = 0.0
    seg_cost = 0.0
    cost = egress = lost_total = spot_h = od_h = 0.0
    preemptions = moves = launches = failed = 0
    last_zone: int | None = None
    data_region: str | None = None
    timeline: list[Segment] = []
    history: list[Outcome] = []
    completion: float | None = None
    forced = False

    def close(end_h: float, reason: str) -> None:
        nonlocal cur, cur_z, seg_cost
        assert cur is not None
        timeline.append(Segment(seg_start, end_h, cur.kind, market.zones[cur_z], reason, seg_cost))
        history.append(Outcome(reason, market.zones[cur_z], cur.kind == "spot", end_h))  # type: ignore[arg-type]
        cur, cur_z, seg_cost = None, -1, 0.0

    for t in range(max_ticks):
        now = t * g
        # 1. preemption at the boundary
        if cur is not None and cur.kind == "spot" and not market.avail(cur_z, o + t):
            lost = 0.0 if job.notice_save else work - committed
            work -= lost
            lost_total += lost
            committed = work
            zone_key = market.zones[cur_z]
            close(now, "preempted")
            preemptions += 1
            policy.on_preempted(zone_key, now)
        # 2. decide; a failed launch is known at once and the policy asked again
        delay = 0.0
        launched_now = False
        for _ in range(Z + 1):
            obs = observe_job(
                now_h=now + delay,
                work_done_h=work,
                work_total_h=W,
                deadline_h=D,
                restart_overhead_h=R,
                current=cur,
                zones=market.facts(o + t),
                history=history,
                step_h=g - delay,
                work_at_risk_h=0.0 if job.notice_save else work - committed,
                expected_loss_h=job.expected_loss_h,
                overhead_left_h=overhead_left if cur else 0.0,
                home_region=data_region,
                move_cost_usd=job.move_cost_usd,
            )
            dec = policy.decide(obs)
            if dec.kind == "ondemand" and dec.zone is None:
                dec = Decision.ondemand(market.zones[market.cheapest_ondemand])
            if cur is not None and dec != cur:
                committed = work  # graceful stop: checkpoint first
                close(now + delay, "stopped")
            if cur is not None or dec.kind == "wait":
                break
            if dec.zone not in market.zones:
                raise ValueError(f"policy {getattr(policy, 'name', policy)!r} chose unknown zone {dec.zone!r}")
            z = market.index(dec.zone)
            if dec.kind == "spot" and not market.avail(z, o + t):
                failed += 1
                history.append(Outcome("no_capacity", dec.zone, True, now + delay))  # type: ignore[arg-type]
                policy.on_launch_failed(dec.zone, now + delay)  # type: ignore[arg-type]
                delay = min(delay + job.failed_launch_h, g / 2)
                continue
            cur, cur_z = dec, z
            overhead_left, seg_start, seg_base, seg_cost = R, now + delay, work, 0.0
            history.append(Outcome("launched", dec.zone, dec.kind == "spot", now + delay))  # type: ignore[arg-type]
            launched_now = True
            launches += 1
            if last_zone is not None and z != last_zone:
                moves += 1
            last_zone = z
            region = market.regions[z]
            if data_region is not None and region != data_region:
                egress += job.move_cost_usd
            data_region = region
            break
        # 3. run the tick (an instance launched after failed attempts starts that much later)
        if cur is None:
            continue
        span = g - delay if launched_now else g
        price = market.price(cur_z, o + t) if cur.kind == "spot" else market.ondemand_price[cur_z]
        oh = min(overhead_left, span)
        overhead_left -= oh
        need = W - work
        if span - oh >= need - EPS:
            used = oh + max(0.0, need)
            cost += price * used
            seg_cost += price * used
            if cur.kind == "spot":
                spot_h += used
            else:
                od_h += used
            work = W
            completion = now + (g - span) + used
            close(completion, "finished")
            break
        cost += price * span
        seg_cost += price * span
        if cur.kind == "spot":
            spot_h += span
        else:
            od_h += span
        work += span - oh
        if interval:
            committed = max(committed, seg_base + math.floor((work - seg_base) / interval + EPS) * interval)
    else:
        # Past the cap: finish on on-demand (see module docstring).
        now = max_ticks * g
        if cur is not None:
            committed = work
            close(now, "stopped")
        z = market.cheapest_ondemand
        used = R + (W - work)
        cost += market.ondemand_price[z] * used
        od_h += used
        timeline.append(
            Segment(now, now + used, "ondemand", market.zones[z], "forced", market.ondemand_price[z] * used)
        )
        completion, forced = now + used, True

    return SimResult(
        policy=getattr(policy, "name", type(policy).__name__),
        cost=cost + egress,
        completion_h=completion,
        deadline_h=D,
        deadline_met=completion is not None and (D is None or completion <= D + 1e-6),
        preemptions=preemptions,
        zone_moves=moves,
        launches=launches,
        failed_launches=failed,
        spot_hours=spot_h,
        ondemand_hours=od_h,
        lost_work_h=lost_total,
        egress_cost=egress,
        ondemand_reference=market.ondemand_reference(job),
        forced_finish=forced,
        timeline=timeline,
        decisions=[(h.at_h, h.kind, h.zone, h.spot) for h in history],
    )


def simulate_one(
    trace_zones: Sequence[ZoneTrace],
    policy_name: str,
    work_hours: float,
    deadline_hours: float | None,
    restart_overhead_h: float = 0.2,
    *,
    spot_price: float | None = None,
    ondemand_price: float | None = None,
    checkpoint_interval_h: float | None = 0.5,
    notice_save: bool = True,
    start_tick: int = 0,
    gap_seconds: float | None = None,
    cap_factor: float = 3.0,
) -> SimResult:
    """One job, one policy, on the given zone traces from ``start_tick`` (the simple entry
    point: ``spotrun simulate`` and the local-provider replay comparison use it)."""
    from spotrun.policies import make_policy

    market = Market.from_traces(
        trace_zones,
        spot_price=spot_price,
        ondemand_price=ondemand_price,
        gap_seconds=gap_seconds,
    )
    job = JobModel(
        work_h=work_hours,
        deadline_h=deadline_hours,
        restart_overhead_h=restart_overhead_h,
        checkpoint_interval_h=checkpoint_interval_h,
        notice_save=notice_save,
    )
    return run(make_policy(policy_name), market, job, cap_factor=cap_factor, start_tick=start_tick)
