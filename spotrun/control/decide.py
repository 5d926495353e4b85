"""The controller's side of the relaunch policy (spotrun/policies/base.py): what the policy is shown, and
what its answer means in offers to launch.

The simulator and the controller call the very same policy objects and show them the same
observation model (spotrun/policies/observe.py): this module turns the controller's world (the
planner's ranked candidates, attempts in State, heartbeats) into those facts, and the policy's
`Decision` back into an ordered list of candidates.
The planner still does what only it can (which offers fit the job, their expected cost with
interruptions, storage and egress); the policy decides *when* to use spot, on-demand, or wait,
and in which zone, from what it has seen happen during the job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from spotrun.policies.base import Decision, Observation, Policy
from spotrun.policies.observe import Outcome, ZoneFacts, observe_job

if TYPE_CHECKING:
    from spotrun.control.state import Attempt
    from spotrun.planner import Candidate

MIN_RESTART_H = 0.01
# Interruption rates the policy must not see: measured over the very trace a local market replays.
UNPUBLISHED_SOURCES = ("trace",)


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


def job_history(attempts: Sequence[Attempt], hour_of: Callable[[float], float]) -> list[Outcome]:
    """The job's own attempts as the observation model's outcomes (times in job hours)."""
    out: list[Outcome] = []
    for a in attempts:
        if a.started_at is not None:
            out.append(Outcome("launched", a.offer_key, a.spot, hour_of(a.started_at)))
        at = hour_of(a.ended_at if a.ended_at is not None else a.created_at)
        reason = a.end_reason
        if reason == "launch_failed" and a.detail.startswith("NoCapacity"):
            out.append(Outcome("no_capacity", a.offer_key, a.spot, at))
        elif reason in ("preempted", "lost") and a.started_at is not None:
            out.append(Outcome("preempted", a.offer_key, a.spot, at))
        elif reason in ("switched", "failed") and a.started_at is not None:
            out.append(Outcome("stopped", a.offer_key, a.spot, at))
        elif reason == "completed":
            out.append(Outcome("finished", a.offer_key, a.spot, at))
    return sorted(out, key=lambda o: o.at_h)


def observation(
    candidates: Sequence[Candidate],
    *,
    now_h: float,
    progress: float,
    deadline_h: float | None,
    current: Decision | None,
    cooling: set[str],
    history: Sequence[Outcome],
    step_h: float,
) -> Observation:
    """What the policy sees (spotrun.policies.observe): one zone per offer that fits, with its
    prices and published interruption rate, the job's own attempts, its progress in hours of
    work (the best candidate's estimate), its deadline, and what runs now."""
    zones: dict[str, ZoneFacts] = {}
    for c in candidates:
        o = c.offer
        if o.key in zones:
            continue
        published = o.interruption_source not in UNPUBLISHED_SOURCES and o.interruption_rate > 0
        zones[o.key] = ZoneFacts(
            key=o.key,
            region=o.region,
            spot_price=o.spot_price,
            ondemand_price=o.ondemand_price,
            published_rate=o.interruption_rate if published else None,
        )
    best = min(candidates, key=lambda c: c.expected_cost) if candidates else None
    remaining = best.base_hours if best is not None else 0.0
    total = remaining / (1.0 - progress) if progress < 1.0 else remaining
    # When the planner finds the final save does not fit in the notice, a preemption loses work:
    # say so (conservatively, the planner's whole loss per preemption), so no policy counts on it.
    at_risk = 0.0 if best is None or best.final_save_fits else best.hours_lost_per_preemption
    return observe_job(
        now_h=now_h,
        work_done_h=total - remaining,
        work_total_h=total,
        deadline_h=deadline_h,
        restart_overhead_h=max(MIN_RESTART_H, best.hours_lost_per_preemption if best else MIN_RESTART_H),
        current=current,
        zones=zones.values(),
        history=history,
        step_h=step_h,
        work_at_risk_h=at_risk,
        expected_loss_h=at_risk,
        cooling=cooling,
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
