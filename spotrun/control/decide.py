"""The controller's side of the relaunch policy (spotrun/policies/base.py): what the policy is shown, and
what its answer means in offers to launch.

The simulator and the controller call the very same policy objects; this module turns the
controller's world (the planner's ranked candidates, attempts in State, heartbeats) into the
policy's `Observation`, and the policy's `Decision` back into an ordered list of candidates.
The planner still does what only it can (which offers fit the job, their expected cost with
interruptions, storage and egress); the policy decides *when* to use spot, on-demand, or wait,
and in which zone, from what it has seen happen during the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from spotrun.policies.base import Decision, Observation, Policy, ZoneView

if TYPE_CHECKING:
    from spotrun.control.state import Attempt
    from spotrun.planner import Candidate

MIN_RESTART_H = 0.01


def make_job_policy(name: str, attempts: Sequence[Attempt], hour_of: dict[int, float]) -> Policy:
    """A fresh policy for a job, told what already happened (a resumed controller relearns the
    job's history from State). `hour_of[n]` is attempt n's end in job hours."""
    from spotrun.policies import make_policy

    policy = make_policy(name)
    for a in attempts:
        at = hour_of.get(a.n, 0.0)
        if a.end_reason == "preempted":
            policy.on_preempted(a.offer_key, at)
        elif a.end_reason == "launch_failed":
            policy.on_launch_failed(a.offer_key, at)
    return policy


def observation(
    candidates: Sequence[Candidate],
    *,
    now_h: float,
    progress: float,
    deadline_h: float | None,
    current: Decision | None,
    cooling: set[str],
    unavailable: set[str],
    step_h: float,
) -> Observation:
    """What the policy sees: one zone view per offer that fits, the job's progress in hours of
    work (the best candidate's estimate), its deadline, and what runs now."""
    zones: dict[str, ZoneView] = {}
    for c in candidates:
        o = c.offer
        if o.key in zones:
            continue
        zones[o.key] = ZoneView(
            key=o.key,
            region=o.region,
            spot_price=o.spot_price,
            ondemand_price=o.ondemand_price,
            available=False if o.key in unavailable else None,
            interruption_rate=o.interruption_rate,
            in_cooldown=o.key in cooling,
        )
    best = min(candidates, key=lambda c: c.expected_cost) if candidates else None
    remaining = best.base_hours if best is not None else 0.0
    total = remaining / (1.0 - progress) if progress < 1.0 else remaining
    return Observation(
        now_h=now_h,
        work_done_h=total - remaining,
        work_total_h=total,
        deadline_h=deadline_h,
        restart_overhead_h=max(MIN_RESTART_H, best.hours_lost_per_preemption if best else MIN_RESTART_H),
        current=current,
        zones=list(zones.values()),
        step_h=step_h,
    )


def order_for(decision: Decision, candidates: Sequence[Candidate], *, allow_ondemand: bool) -> list[Candidate]:
    """The candidates to try for a decision, best first: the chosen zone in the chosen market,
    then (as failover if that launch finds no capacity) the rest of the same market in the
    planner's order. An on-demand decision on a spot-only plan makes on-demand candidates from
    the same offers when the spec allows falling back to on-demand."""
    if decision.kind == "wait":
        return []
    spot = decision.kind == "spot"
    same = [c for c in candidates if c.spot == spot]
    if not spot and not same and allow_ondemand:
        same = sorted(
            (
                replace(c, spot=False, hourly_price=c.offer.ondemand_price)
                for c in candidates
                if c.spot and c.offer.ondemand_price is not None
            ),
            key=lambda c: c.hourly_price,
        )
        seen: set[str] = set()
        same = [c for c in same if not (c.offer.key in seen or seen.add(c.offer.key))]  # type: ignore[func-returns-value]
    if decision.zone is None:
        return same
    chosen = [c for c in same if c.offer.key == decision.zone]
    return chosen + [c for c in same if c.offer.key != decision.zone]
