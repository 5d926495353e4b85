"""spotrun's own relaunch policy: multi-zone, restart-aware, deadline-aware, within the honest
observation model (spotrun/policies/observe.py: its own attempts, prices, published rates).

Slack ``S`` is the time the job can still lose and yet finish on on-demand after one more
launch. Every launch spends ``R`` (the restart overhead) of it, waiting spends it by the hour,
running (spot or on-demand) keeps it. What the default does:

* **Restart-aware floor.** A spot instance past its restart overhead whose work is saved on the
  preemption notice makes progress until the next decision and loses nothing if preempted then,
  so it may run down to zero slack (``ondemand_needed(..., progress_credit=True)``); preempted
  there, an on-demand launch still finishes by the deadline.
* **Restart-aware choice between spot and on-demand.** A spot launch with less slack than its
  own overhead (in whole decision steps) would be stopped by the floor before it made progress:
  go on-demand at once instead.
* **Back off from capacity that just returned; prefer capacity that has lasted.** A zone that
  preempted the job in the last ``backoff_h`` is tried after every other zone; among the rest,
  the cheapest first, then the one whose last trouble (preemption, no capacity) is oldest. A
  price-aware variant (``flap_loss_p``: back off only behind zones of about the same price) is an
  option, off by default: it ignores the slack a lost relaunch spends (docs/POLICIES.md).
* **Wait while the slack pays for it**, trying every zone once per decision, until the floor
  says on-demand; then on-demand to the end.

Options measured on the tuning traces and off by default (they cost more there; see
docs/POLICIES.md): bridging on on-demand before the slack runs out and returning to spot
(``bridge_launches``, ``retry_h``, ``return_gain``), waiting after a preemption rather than
relaunching elsewhere (``wait_backoff``), and moving a running job to a zone that became cheaper
(``move_gain``, ``move_payback``).

Every constant here was chosen on the tuning half of shared/data (traces collected before
2023), never on the reporting half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spotrun.policies.base import Decision, Observation, ZoneView, ondemand_needed, slack_h
from spotrun.policies.baseline import BasePolicy, ondemand_decision

INF = float("inf")


@dataclass
class ZoneRecord:
    """What the job's own attempts say about one zone."""

    last_bad_h: float = -INF  # latest preemption or launch that found no capacity
    last_preempted_h: float = -INF
    launched_h: float | None = None  # when the instance running there now was launched


def zone_records(obs: Observation) -> dict[str, ZoneRecord]:
    out: dict[str, ZoneRecord] = {}
    for o in obs.history:
        if not o.spot:
            continue
        r = out.setdefault(o.zone, ZoneRecord())
        if o.kind in ("preempted", "no_capacity"):
            r.last_bad_h = max(r.last_bad_h, o.at_h)
            if o.kind == "preempted":
                r.last_preempted_h = max(r.last_preempted_h, o.at_h)
        if o.kind == "launched":
            r.launched_h = o.at_h
    return out


class SpotrunPolicy(BasePolicy):
    name = "spotrun"
    sees = (
        "its own attempts and their outcomes (to back off from zones that just failed it), "
        "spot and on-demand prices, the slack left"
    )

    def __init__(
        self,
        *,
        backoff_h: float = 2.0,
        flap_loss_p: float = INF,
        flap_slack_weight: float = 0.0,
        launch_slack: float = 1.0,
        bridge_launches: float = 0.0,
        retry_h: float = 1.0,
        return_gain: float = 3.0,
        move_gain: float = 1.0,
        move_payback: float = 4.0,
        wait_backoff: bool = False,
    ) -> None:
        self.backoff_h = backoff_h
        self.flap_loss_p = flap_loss_p
        self.flap_slack_weight = flap_slack_weight
        self.launch_slack = launch_slack
        self.wait_backoff = wait_backoff
        self.bridge_launches = bridge_launches
        self.retry_h = retry_h
        self.return_gain = return_gain
        self.move_gain = move_gain
        self.move_payback = move_payback
        self.final_ondemand = False
        self.failed_returns = 0
        self._od_since: float | None = None
        self._returning_at: float | None = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _od_price(obs: Observation) -> float:
        best = obs.cheapest_ondemand()
        return best.ondemand_price if best and best.ondemand_price is not None else INF

    def _candidates(self, obs: Observation, recs: dict[str, ZoneRecord]) -> list[ZoneView]:
        """Spot zones worth a launch, best first: not known to be down, no recent trouble before
        recent trouble, then the cheapest, then the longest since its last trouble.

        With a finite ``flap_loss_p``, a zone that preempted the job in the last ``backoff_h`` is
        instead priced as if its launch were lost and paid again with that probability (a
        ``flap_loss_p * R / remaining`` markup): after zones of about the same price, not after
        dearer ones. That counts the money of a lost launch but not the slack it spends, which
        can send the rest of the job to on-demand; off by default (docs/POLICIES.md). With
        ``flap_slack_weight`` it also counts the slack: the share ``R / S`` of the slack left that
        a lost relaunch spends, times the on-demand premium over the zone's spot price (measured
        on the tuning set only; the candidate for the next default)."""
        zones = [z for z in obs.zones if z.spot_price is not None and z.available is not False and not z.in_cooldown]
        now = obs.now_h
        R = obs.restart_overhead_h
        markup = self.flap_loss_p * R / max(obs.remaining_h, R, 1e-9)
        # With flap_slack_weight, a lost relaunch also spends R of the slack S left: that share
        # of it, times what running out costs (the rest of the job on on-demand, not spot).
        slack_share = R / max(slack_h(obs), R, 1e-9)
        od = self._od_price(obs)

        def key(z: ZoneView) -> tuple[float, float, float]:
            r = recs.get(z.key)
            bad = r.last_bad_h if r else -INF
            preempted = r.last_preempted_h if r else -INF
            price = z.spot_price or 0.0
            flapping = now - preempted < self.backoff_h
            if not flapping:
                return (0.0, price, bad)
            if math.isinf(self.flap_loss_p):
                return (1.0, price, bad)
            slack_cost = self.flap_slack_weight * self.flap_loss_p * slack_share * max(0.0, od - price)
            return (0.0, price * (1.0 + markup) + slack_cost, INF)  # after a zone of the same price

        return sorted(zones, key=key)

    def _recently_preempted(self, obs: Observation, z: ZoneView, recs: dict[str, ZoneRecord]) -> bool:
        r = recs.get(z.key)
        return r is not None and obs.now_h - r.last_preempted_h < self.backoff_h

    # ------------------------------------------------------------------ decision
    def decide(self, obs: Observation) -> Decision:
        if self.final_ondemand or ondemand_needed(obs, progress_credit=True):
            self.final_ondemand = True
            return ondemand_decision(obs)
        R, step = obs.restart_overhead_h, obs.step_h
        cur = obs.current
        on_od = cur is not None and cur.kind == "ondemand"
        # Slack in "idle" terms: time to spare if the job launched on-demand right now.
        s_idle = slack_h(obs) - (R - obs.overhead_left_h if on_od else 0.0)
        od = self._od_price(obs)
        recs = zone_records(obs)
        cands = self._candidates(obs, recs)
        # Bridge on on-demand with this much slack left: its launch, then room for returns to spot.
        bridge_at = self.bridge_launches * R + 2 * step if self.bridge_launches > 0 else 0.0
        if not on_od:
            self._od_since = None

        if cur is not None and cur.kind == "spot":
            self.failed_returns = 0
            return self._maybe_move(obs, cur, cands, s_idle)

        if on_od:
            if self._od_since is None:
                self._od_since = obs.now_h
            return self._maybe_return(obs, cur, cands, s_idle, od)  # type: ignore[arg-type]

        # Idle.
        if self._returning_at is not None and obs.now_h - self._returning_at < step:
            self.failed_returns += 1  # the spot launch that was to replace on-demand failed
        self._returning_at = None
        # A spot launch spends its overhead without progress: with less slack than that, the floor
        # would stop it before it made any (restart-aware: go on-demand now instead).
        # (The launch spends exactly R of slack: each decision while the overhead is paid needs only
        # the overhead still to pay, since progress is credited once it is paid. Rounding R up to
        # whole decision steps, as before, doubled it after a failed launch had shortened the step,
        # and sent a job with slack for one spot launch to on-demand.)
        overhead_span = R * self.launch_slack
        if cands and s_idle - overhead_span < -1e-9:
            self.final_ondemand = True
            return ondemand_decision(obs)
        if cands:
            best = cands[0]
            # Back off from capacity that just preempted us while the slack can afford it.
            if (
                self.wait_backoff
                and self._recently_preempted(obs, best, recs)
                and s_idle - step > bridge_at + self.backoff_h
            ):
                return Decision.wait()
            return Decision.spot(best.key)
        if s_idle - step >= bridge_at:
            return Decision.wait()
        return ondemand_decision(obs)

    def _maybe_move(self, obs: Observation, cur: Decision, cands: list[ZoneView], s_idle: float) -> Decision:
        here = obs.zone(cur.zone or "")
        if here is None or here.spot_price is None or obs.overhead_left_h > 0:
            return cur
        R, W = obs.restart_overhead_h, obs.remaining_h
        for z in cands:
            if z.key == cur.zone or z.spot_price is None:
                continue
            cheaper = z.spot_price < here.spot_price * (1.0 - self.move_gain)
            saving = (here.spot_price - z.spot_price) * W
            move_cost = z.spot_price * R + (obs.move_cost_usd if z.region != obs.home_region else 0.0)
            if cheaper and saving > self.move_payback * move_cost and s_idle > 2 * R + 2 * obs.step_h:
                return Decision.spot(z.key)
        return cur

    def _maybe_return(
        self, obs: Observation, cur: Decision, cands: list[ZoneView], s_idle: float, od: float
    ) -> Decision:
        R, W, step = obs.restart_overhead_h, obs.remaining_h, obs.step_h
        if not cands or obs.overhead_left_h > 0 or self._od_since is None:
            return cur
        wait_h = self.retry_h * (2**self.failed_returns)
        best = cands[0]
        gain = (od - (best.spot_price or od)) * W
        if (
            obs.now_h - self._od_since >= wait_h
            and s_idle >= 2 * R + step - 1e-9  # a spot launch, and an on-demand one should it fail
            and gain > self.return_gain * od * R
        ):
            self._returning_at = obs.now_h
            return Decision.spot(best.key)
        return cur
