"""The observation model: what a relaunch policy is allowed to see, built in one place.

The simulator (``spotrun/simulate/engine.py``) and the controller (``spotrun/control/decide.py``)
both build a policy's :class:`~spotrun.policies.base.Observation` with :func:`observe_job`, from
the same kinds of facts, so a policy measured on replayed traces sees exactly what it would see
in a real launch:

* **The job's own history**: every launch attempt and its outcome, with times in job hours
  (:class:`Outcome`: launched, no capacity, preempted, stopped).
* **Prices the catalog can read**: each zone's current spot price and its on-demand price.
* **Published interruption statistics** (:class:`ZoneFacts.published_rate`: e.g. the AWS Spot
  Advisor bucket as preemptions per hour), never a rate measured over the very trace being
  replayed.
* **What a launch attempt reveals**: a spot launch that found no capacity marks that zone
  unavailable until the next decision (half a decision step); the zone the job runs spot in
  now has capacity.

Not in it: any other zone's capacity while the job runs. ``ZoneView.available`` is ``None``
(unknown) for every zone the job has not just tried.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from spotrun.policies.base import Decision, Observation, ZoneView

OutcomeKind = Literal["launched", "no_capacity", "preempted", "stopped", "finished"]

OBSERVATION_MODEL = (
    "the job's own launch attempts and their outcomes (launched, no capacity, preempted, with times); "
    "current spot and on-demand prices per zone; published interruption rates where known; "
    "a spot launch that found no capacity marks its zone unavailable until the next decision. "
    "Never other zones' capacity while the job runs."
)


@dataclass(frozen=True)
class Outcome:
    """One thing that happened to the job: ``kind`` in ``zone`` (spot or on-demand) at ``at_h``."""

    kind: OutcomeKind
    zone: str
    spot: bool
    at_h: float


@dataclass(frozen=True)
class ZoneFacts:
    """What the catalog knows about a zone now, with no look at its capacity."""

    key: str
    region: str
    spot_price: float | None
    ondemand_price: float | None
    published_rate: float | None = None  # preemptions per hour from a published source


def zone_views(
    zones: Iterable[ZoneFacts],
    history: Sequence[Outcome],
    now_h: float,
    current: Decision | None,
    step_h: float,
    cooling: Iterable[str] = (),
) -> list[ZoneView]:
    """Each zone as the job may see it: capacity known only from its own launch attempts.

    A launch that found no capacity is news for the decision round it happened in (younger
    than half a decision step); the next decision may try the zone again."""
    failed: dict[str, float] = {}
    launched: dict[str, float] = {}
    for o in history:
        if not o.spot:
            continue
        if o.kind == "no_capacity":
            failed[o.zone] = max(failed.get(o.zone, o.at_h), o.at_h)
        elif o.kind == "launched":
            launched[o.zone] = max(launched.get(o.zone, o.at_h), o.at_h)
    cool = set(cooling)
    running = current.zone if current is not None and current.kind == "spot" else None
    out = []
    for z in zones:
        avail: bool | None = None
        if z.key == running:
            avail = True
        elif z.key in failed and now_h - failed[z.key] < step_h / 2:
            if launched.get(z.key, -1e18) < failed[z.key]:
                avail = False
        out.append(
            ZoneView(
                key=z.key,
                region=z.region,
                spot_price=z.spot_price,
                ondemand_price=z.ondemand_price,
                available=avail,
                interruption_rate=z.published_rate,
                in_cooldown=z.key in cool,
            )
        )
    return out


def observe_job(
    *,
    now_h: float,
    work_done_h: float,
    work_total_h: float,
    deadline_h: float | None,
    restart_overhead_h: float,
    current: Decision | None,
    zones: Iterable[ZoneFacts],
    history: Sequence[Outcome],
    step_h: float,
    work_at_risk_h: float = 0.0,
    expected_loss_h: float = 0.0,
    overhead_left_h: float = 0.0,
    home_region: str | None = None,
    move_cost_usd: float = 0.0,
    cooling: Iterable[str] = (),
) -> Observation:
    """The :class:`Observation` a policy gets, in the simulator and in the controller alike."""
    return Observation(
        now_h=now_h,
        work_done_h=work_done_h,
        work_total_h=work_total_h,
        deadline_h=deadline_h,
        restart_overhead_h=restart_overhead_h,
        current=current,
        zones=zone_views(zones, history, now_h, current, step_h, cooling),
        step_h=step_h,
        work_at_risk_h=work_at_risk_h,
        expected_loss_h=expected_loss_h,
        overhead_left_h=overhead_left_h,
        home_region=home_region,
        move_cost_usd=move_cost_usd,
        history=tuple(history),
    )
