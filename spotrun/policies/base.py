"""The relaunch-policy interface shared by the controller and the simulator.

A policy is asked, at each decision point (every poll of the controller, every tick of the
simulator), what the job should be running *now*: spot in zone Z, on-demand, or nothing.
The controller and ``spotrun simulate`` call the very same objects, so what the simulator
measures on real traces is what the controller does.

The policy sees only the present and the past (an :class:`Observation`); it may keep state
between calls (what it learned about each zone), so make a fresh one per job with
:func:`make_policy`. Two notifications tell it what happened between decisions:
``on_preempted`` (the spot instance it chose was reclaimed) and ``on_launch_failed`` (a
launch it asked for found no capacity); ``observe`` feeds it what was seen of the zones
outside decisions (history from before the job, probes).

Semantics the callers guarantee:

* ``work_done_h`` is progress in hours of compute (lost work already subtracted);
  ``work_at_risk_h`` is the part of it a preemption right now would lose (work since the
  last checkpoint, 0 when a notice-time save is reliable); ``expected_loss_h`` is what a
  preemption loses on average (half a checkpoint interval without a notice-time save).
* ``step_h`` is the time until the next decision; ``overhead_left_h`` the part of the
  restart overhead the running instance has still to pay.
* Returning the ``current`` decision unchanged keeps the running instance; returning
  anything else stops it gracefully (with a checkpoint, so nothing is lost) and, for
  ``spot``/``ondemand``, launches the new one, which pays ``restart_overhead_h`` of billed
  time before it makes progress.
* A ``spot`` decision in a zone without capacity fails at no cost; the job stays idle
  until the next decision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from spotrun.policies.observe import Outcome

DecisionKind = Literal["spot", "ondemand", "wait"]


@dataclass(frozen=True)
class Decision:
    """Run spot in ``zone``, run on-demand (in ``zone``, or the cheapest when None), or wait."""

    kind: DecisionKind
    zone: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("spot", "ondemand", "wait"):
            raise ValueError(f"unknown decision kind {self.kind!r}")
        if self.kind == "spot" and not self.zone:
            raise ValueError("a spot decision needs a zone")

    @classmethod
    def spot(cls, zone: str) -> Decision:
        return cls("spot", zone)

    @classmethod
    def ondemand(cls, zone: str | None = None) -> Decision:
        return cls("ondemand", zone)

    @classmethod
    def wait(cls) -> Decision:
        return cls("wait", None)

    @property
    def running(self) -> bool:
        return self.kind != "wait"

    def __str__(self) -> str:
        return self.kind if self.zone is None else f"{self.kind}@{self.zone}"


WAIT = Decision("wait")


@dataclass(frozen=True)
class ZoneView:
    """What the caller knows about one zone right now.

    ``available`` is True/False when it was observed (a probe, a launch, a failed launch,
    a trace tick) and None when unknown. ``interruption_rate`` is a prior from the catalog,
    as preemptions per hour of running (None when unknown).
    """

    key: str
    region: str
    spot_price: float | None
    ondemand_price: float | None
    available: bool | None = None
    interruption_rate: float | None = None
    in_cooldown: bool = False


@dataclass(frozen=True)
class Observation:
    """Everything a policy may look at when deciding (times in hours since the job started)."""

    now_h: float
    work_done_h: float
    work_total_h: float
    deadline_h: float | None
    restart_overhead_h: float
    current: Decision | None
    zones: Sequence[ZoneView]
    step_h: float = 1.0 / 6.0
    work_at_risk_h: float = 0.0
    expected_loss_h: float = 0.0
    overhead_left_h: float = 0.0
    home_region: str | None = None  # where the latest checkpoint lives
    move_cost_usd: float = 0.0  # egress of moving the checkpoint out of ``home_region``
    # The job's own launch attempts and outcomes so far, oldest first (spotrun.policies.observe).
    history: tuple[Outcome, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def remaining_h(self) -> float:
        return max(0.0, self.work_total_h - self.work_done_h)

    @property
    def time_left_h(self) -> float | None:
        return None if self.deadline_h is None else self.deadline_h - self.now_h

    def zone(self, key: str) -> ZoneView | None:
        for z in self.zones:
            if z.key == key:
                return z
        return None

    def cheapest_ondemand(self) -> ZoneView | None:
        priced = [z for z in self.zones if z.ondemand_price is not None]
        return min(priced, key=lambda z: z.ondemand_price) if priced else None  # type: ignore[arg-type,return-value]


@runtime_checkable
class Policy(Protocol):
    """A relaunch policy. ``decide`` must be cheap: it runs every tick of a simulation."""

    name: str

    def decide(self, obs: Observation) -> Decision: ...

    def on_preempted(self, zone_key: str, now_h: float) -> None: ...

    def on_launch_failed(self, zone_key: str, now_h: float) -> None: ...

    def observe(self, now_h: float, zones: Sequence[ZoneView]) -> None:
        """What was seen of the zones without a decision to make: the market's history before
        the job started (``now_h`` < 0), or probes between decisions."""
        ...


def slack_h(obs: Observation, *, committed_only: bool = True) -> float:
    """Hours the job can still afford without progress and still finish on on-demand.

    ``deadline - now - (restart overhead + remaining work)``; with ``committed_only`` the
    work at risk counts as lost (the worst case: a preemption before the next checkpoint).
    Infinite when there is no deadline. When already on on-demand the restart is paid.
    """
    if obs.deadline_h is None:
        return float("inf")
    if obs.current is not None and obs.current.kind == "ondemand":
        need = obs.overhead_left_h + obs.remaining_h
    else:
        lost = obs.work_at_risk_h if committed_only else 0.0
        need = obs.restart_overhead_h + obs.remaining_h + lost
    return obs.deadline_h - obs.now_h - need


def ondemand_needed(obs: Observation, margin_h: float = 0.0, *, progress_credit: bool = False) -> bool:
    """True when not being on on-demand by the *next* decision could miss the deadline.

    The next decision comes ``step_h`` later; in the worst case nothing is gained until
    then and the work at risk is lost, so we need ``slack >= step_h + margin``.

    With ``progress_credit``, a spot instance past its restart overhead whose work is saved on
    the preemption notice (nothing at risk) is credited the progress it makes until the next
    decision: preempted then, it has lost nothing, so it needs only ``slack >= margin``.
    """
    credit = 0.0
    cur = obs.current
    if progress_credit and cur is not None and cur.kind == "spot":
        if obs.work_at_risk_h <= 0 and obs.expected_loss_h <= 0:
            credit = max(0.0, obs.step_h - obs.overhead_left_h)
    return slack_h(obs) < obs.step_h - credit + margin_h - 1e-9


PolicyFactory = Callable[[], Policy]
