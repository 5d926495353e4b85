"""Uniform Progress, the single-zone policy of "Can't Be Late" (Wu et al., NSDI 2024).

Implemented from the paper's description of its rules. With C the job's compute, D the
deadline, d the restart overhead, cp(t) the progress made and ep(t) = C * t / D the progress
a job moving at a uniform rate would have made:

1. Uniform progress: when idle and cp(t) < ep(t), switch to on-demand to catch up.
2. Taking risks: use spot whenever it is available, even when behind; stay on it until it
   is preempted.
3. Hysteresis: once on on-demand, stay on it until cp(t) >= ep(t + 2d).
4. Safety net: when idle and the time left is below the remaining compute + 2d, switch to
   on-demand and stay there to the end.

This is a *reference*, not a recommendation: the paper assumes the zone's availability is
observable at every step, which the controller's observation model does not give
(spotrun/policies/observe.py). The paper's policy is for one zone; given several, it settles
on the zone with the cheapest spot price at its first decision and only ever uses that one. Like every deadline-aware
policy here it also honours :func:`spotrun.policies.base.ondemand_needed`, so the simulator's
decision step can never make it late.
"""

from __future__ import annotations

from spotrun.policies.base import Decision, Observation, ondemand_needed
from spotrun.policies.baseline import BasePolicy, ondemand_decision


class UniformProgressPolicy(BasePolicy):
    name = "uniform-progress"
    sees = "its home zone's spot price and launch outcomes, progress against the deadline"

    def __init__(self) -> None:
        self.home: str | None = None
        self.final_ondemand = False

    def _expected_progress(self, obs: Observation, t_h: float) -> float:
        if obs.deadline_h is None or obs.deadline_h <= 0:
            return 0.0
        return obs.work_total_h * min(1.0, t_h / obs.deadline_h)

    def decide(self, obs: Observation) -> Decision:
        if self.home is None:
            priced = [z for z in obs.zones if z.spot_price is not None] or list(obs.zones)
            self.home = min(priced, key=lambda z: z.spot_price or 0.0).key if priced else None
        home = obs.zone(self.home) if self.home else None
        spot_ok = home is not None and home.available is not False
        d = obs.restart_overhead_h
        cur = obs.current
        if obs.deadline_h is None:  # no deadline: nothing to be uniform about; plain spot
            return (
                cur
                if cur is not None and cur.kind == "spot"
                else (Decision.spot(home.key) if spot_ok and home else Decision.wait())
            )
        if self.final_ondemand or ondemand_needed(obs):
            self.final_ondemand = True
            return ondemand_decision(obs)
        if cur is not None and cur.kind == "spot":
            return cur  # rule 2: exploit spot until preempted
        if cur is not None and cur.kind == "ondemand":
            if obs.work_done_h < self._expected_progress(obs, obs.now_h + 2 * d):
                return cur  # rule 3: hysteresis
            # Ahead of the line: back to spot only where spot is known to be there. Leaving
            # on-demand on a guess drops to waiting when the home zone is down, and then pays the
            # restart again; the controller cannot see a zone's capacity while it runs elsewhere,
            # so in practice this policy stays on on-demand once there (it is a reference).
            return Decision.spot(home.key) if home is not None and home.available is True else cur
        # idle
        time_left = obs.deadline_h - obs.now_h
        if time_left < obs.remaining_h + 2 * d:  # rule 4: safety net
            self.final_ondemand = True
            return ondemand_decision(obs)
        if spot_ok and home:
            return Decision.spot(home.key)  # rule 2
        if obs.work_done_h < self._expected_progress(obs, obs.now_h):
            return ondemand_decision(obs)  # rule 1
        return Decision.wait()
