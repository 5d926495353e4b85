"""The known policies spotrun is measured against: on-demand, greedy and failover."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from spotrun.policies.base import Decision, Observation, ZoneView, ondemand_needed


def spot_candidates(obs: Observation, *, allow_unknown: bool = True) -> list[ZoneView]:
    """Zones a spot launch could succeed in, cheapest first (observed-available before unknown)."""
    zones = [z for z in obs.zones if z.available or (allow_unknown and z.available is None)]
    return sorted(
        zones,
        key=lambda z: (z.available is not True, z.spot_price if z.spot_price is not None else float("inf")),
    )


def ondemand_decision(obs: Observation) -> Decision:
    """On-demand where it is cheapest; stay where we are if already on on-demand."""
    if obs.current is not None and obs.current.kind == "ondemand":
        return obs.current
    best = obs.cheapest_ondemand()
    return Decision.ondemand(best.key if best else None)


class BasePolicy(ABC):
    """Default no-op notifications, so simple policies only write ``decide``."""

    name = "base"
    # What the policy looks at, within the observation model (spotrun.policies.observe): shown
    # by `spotrun simulate` next to its results.
    sees = "nothing"

    @abstractmethod
    def decide(self, obs: Observation) -> Decision: ...

    def on_preempted(self, zone_key: str, now_h: float) -> None:
        return None

    def on_launch_failed(self, zone_key: str, now_h: float) -> None:
        return None

    def observe(self, now_h: float, zones: Sequence[ZoneView]) -> None:
        return None


class OnDemandPolicy(BasePolicy):
    """Never touch spot: the reference every saving is measured against."""

    name = "on-demand"
    sees = "on-demand prices only"

    def decide(self, obs: Observation) -> Decision:
        return ondemand_decision(obs)


class GreedyPolicy(BasePolicy):
    """Spot whenever some zone has it (the cheapest); otherwise wait, until the deadline forces
    on-demand, and then stay on on-demand to the end (the "greedy" baseline of Can't Be Late)."""

    name = "greedy"
    sees = "spot prices, which zones a launch just found without capacity, the slack left"

    def __init__(self) -> None:
        self.committed = False

    def decide(self, obs: Observation) -> Decision:
        if self.committed or ondemand_needed(obs):
            self.committed = True
            return ondemand_decision(obs)
        cur = obs.current
        if cur is not None and cur.kind == "spot":
            return cur
        cands = spot_candidates(obs)
        return Decision.spot(cands[0].key) if cands else Decision.wait()


class FailoverPolicy(BasePolicy):
    """Always spot, never on-demand, deadline-blind: keep the instance while it lives; after a
    preemption retry the same region first (cheapest zone there), then any zone. What users
    get from today's popular spot launchers."""

    name = "failover"
    sees = "spot prices and which zones a launch just found without capacity (deadline-blind)"

    def __init__(self) -> None:
        self.region: str | None = None

    def decide(self, obs: Observation) -> Decision:
        cur = obs.current
        if cur is not None and cur.kind == "spot":
            return cur
        cands = spot_candidates(obs)
        if not cands:
            return Decision.wait()
        same = [z for z in cands if z.region == self.region]
        pick = (same or cands)[0]
        self.region = pick.region
        return Decision.spot(pick.key)
