"""spotrun's own relaunch policy: multi-zone, interruption-aware, deadline-aware.

It prices each spot zone by the *expected cost to finish the job there*, given the slack
left, and keeps a hard floor that never lets a deadline slip:

* **Capacity ages.** On the availability traces in shared/data, capacity that just came
  back is lost 7-38x more often in its first half hour than after six hours. The policy learns
  the preemption hazard per *age* of a zone's capacity, pooled over the market, and a
  per-zone factor (how much flakier or steadier this zone is than the market at the same
  ages), from what it sees: every zone's capacity at each decision, the market history
  before the job, its own preemptions and failed launches. A zone with little history
  starts at the market's behaviour (or the catalog's interruption rate).
* **Slack is a budget of preemptions.** Slack ``S`` is the time the job can still lose and
  yet finish on on-demand after one more launch. Each preemption costs ``R + L`` of it
  (restart overhead plus lost work), so spot can survive ``k = floor((S - step)/(R + L))``
  more; the next forces on-demand for the rest. With preemptions at rate ``lam`` per
  running hour (Poisson), the work left for on-demand is ``E[(W - T_{k+1})+]`` with
  ``T_{k+1} ~ Erlang(k+1, lam)``, in closed form (:func:`ondemand_share`). A zone's expected
  cost is its spot hours at its price, with the overhead of expected preemptions, plus
  that on-demand tail, plus the launch and any egress. A cheap but flaky zone is worth
  less when slack is short, which is exactly when flakiness hurts.
* **Where and when.** Idle, it launches in the zone of least expected cost when that beats
  on-demand. With no spot worth it, it waits while the slack still allows coming back to
  spot afterwards, and then bridges on on-demand instead of burning the last slack; from
  on-demand it returns to spot once a zone has proven itself (its hazard at its current
  age wastes little), which plain greedy never does. A running instance is kept unless
  a proven zone is really cheaper (price and expected cost both lower by ``move_gain``).
* **Hard floor.** When even the worst case (preempted before the next decision, losing the
  work at risk) would leave too little time, it commits to on-demand to the end
  (:func:`spotrun.policies.base.ondemand_needed`), so it meets every deadline that on-demand can.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from spotrun.policies.base import Decision, Observation, ZoneView, ondemand_needed, slack_h
from spotrun.policies.baseline import BasePolicy, ondemand_decision

INF = float("inf")
# Ages (hours since a zone's capacity came back) at which the preemption hazard is learned
# separately: on the availability traces in shared/data, capacity that just came back is
# lost 7-38x more often in its first half hour than after six hours.
AGE_EDGES = (0.0, 0.5, 2.0, 6.0, 24.0)


def age_bucket(age_h: float) -> int:
    b = 0
    for i, edge in enumerate(AGE_EDGES):
        if age_h >= edge:
            b = i
    return b


def ondemand_share(lam: float, work_h: float, survivable: int) -> tuple[float, float]:
    """Expected work left for on-demand, and the chance it is needed at all.

    Preemptions arrive at ``lam`` per hour of spot running; the ``survivable + 1``-th one
    forces on-demand for the rest of ``work_h``. With ``N ~ Poisson(lam * W)`` and
    ``T_n ~ Erlang(n, lam)``: ``E[(W - T_n)+] = W - (1/lam) * sum_{j=1..n} P(N >= j)`` and
    ``P(T_n < W) = P(N >= n)``.
    """
    n = survivable + 1
    m = lam * work_h
    if work_h <= 0 or m <= 1e-12:
        return 0.0, 0.0
    if m > 600:  # exp(-m) underflows; all n arrivals come well before W
        return max(0.0, work_h - n / lam), 1.0
    p = math.exp(-m)  # P(N = j), starting at j = 0
    cdf = p  # P(N <= j - 1) at the top of iteration j
    total = 0.0
    tail = 0.0
    for j in range(1, n + 1):
        tail = 1.0 - cdf  # P(N >= j)
        if tail < 1e-12:
            tail = 0.0
            break
        total += tail
        p *= m / j
        cdf += p
    # After the loop, ``tail`` is P(N >= n) unless it broke early, where it is ~0.
    return max(0.0, work_h - total / lam), tail


@dataclass
class ZoneStats:
    """One zone as seen so far: exposure (hours up) and losses by age bucket, outages."""

    exposure: list[float] = field(default_factory=lambda: [0.0] * len(AGE_EDGES))
    ends: list[float] = field(default_factory=lambda: [0.0] * len(AGE_EDGES))
    down_h: float = 0.0
    starts: float = 0.0
    last: bool | None = None
    last_seen_h: float | None = None
    since_h: float | None = None  # when the current state began (as far as seen)

    def age(self, now_h: float) -> float:
        return 0.0 if self.since_h is None else max(0.0, now_h - self.since_h)

    def see(self, available: bool, now_h: float) -> bool:
        """Record a sighting; True when it shows the zone going down."""
        went_down = False
        if self.last is not None and self.last_seen_h is not None:
            dt = max(0.0, now_h - self.last_seen_h)
            if self.last:
                b = age_bucket(self.age(self.last_seen_h))
                self.exposure[b] += dt
                went_down = not available
                self.ends[b] += went_down
            else:
                self.down_h += dt
                self.starts += available
        if self.last != available:
            self.since_h = now_h
        self.last, self.last_seen_h = available, now_h
        return went_down


class SpotrunPolicy(BasePolicy):
    name = "spotrun"

    def __init__(
        self,
        *,
        prior_uptime_h: float = 6.0,
        prior_hours: float = 2.0,
        horizon_h: float = 6.0,
        waste_ok: float = 0.1,
        reserve_launches: float = 1.0,
        move_gain: float = 0.1,
    ) -> None:
        self.prior_uptime_h = prior_uptime_h
        self.prior_hours = prior_hours
        self.horizon_h = horizon_h
        self.waste_ok = waste_ok
        self.reserve_launches = reserve_launches
        self.move_gain = move_gain
        self.stats: dict[str, ZoneStats] = {}
        self.final_ondemand = False
        self._seen_at: float | None = None

    # ------------------------------------------------------------------ learning
    def observe(self, now_h: float, zones: Sequence[ZoneView]) -> None:
        if self._seen_at is not None and now_h <= self._seen_at:
            return
        self._seen_at = now_h
        for z in zones:
            if z.available is not None:
                self.stats.setdefault(z.key, ZoneStats()).see(z.available, now_h)

    def on_preempted(self, zone_key: str, now_h: float) -> None:
        st = self.stats.setdefault(zone_key, ZoneStats())
        if st.last is not False:  # capacity not observable: the preemption is the sighting
            st.see(False, now_h)

    def on_launch_failed(self, zone_key: str, now_h: float) -> None:
        self.stats.setdefault(zone_key, ZoneStats()).see(False, now_h)

    def market_rates(self, z: ZoneView | None = None) -> list[float]:
        """Preemptions per hour by age bucket, pooled over every zone (Gamma posterior
        means; the prior is the catalog's interruption rate, else ``1/prior_uptime_h``)."""
        prior = z.interruption_rate if z is not None and z.interruption_rate else 1.0 / self.prior_uptime_h
        out = []
        for b in range(len(AGE_EDGES)):
            ends = sum(s.ends[b] for s in self.stats.values())
            expo = sum(s.exposure[b] for s in self.stats.values())
            out.append((ends + self.prior_hours * prior) / (expo + self.prior_hours))
        return out

    def zone_factor(self, z: ZoneView, rates: list[float]) -> float:
        """How much more (>1) or less often this zone loses capacity than the market at the
        same ages, shrunk toward 1 by ``prior_hours`` worth of market-average behaviour."""
        st = self.stats.get(z.key)
        if st is None:
            return 1.0
        expected = sum(e * r for e, r in zip(st.exposure, rates, strict=True))
        prior = self.prior_hours * rates[-1]
        return (sum(st.ends) + prior) / (expected + prior)

    def hazard(self, z: ZoneView, now_h: float, horizon_h: float | None = None) -> float:
        """Expected preemptions per running hour in ``z`` over the next ``horizon_h`` hours
        (0: right now), given how long its capacity has lasted so far."""
        rates = self.market_rates(z)
        st = self.stats.get(z.key)
        age = st.age(now_h) if st is not None and st.last else 0.0
        factor = self.zone_factor(z, rates)
        if not horizon_h:
            return factor * rates[age_bucket(age)]
        # Average the piecewise-constant hazard over [age, age + horizon].
        total, t, end = 0.0, age, age + horizon_h
        while t < end - 1e-12:
            b = age_bucket(t)
            nxt = AGE_EDGES[b + 1] if b + 1 < len(AGE_EDGES) else INF
            step = min(end, nxt) - t
            total += rates[b] * step
            t += step
        return factor * total / horizon_h

    # ------------------------------------------------------------------ cost model
    def spot_run_cost(self, obs: Observation, z: ZoneView, slack: float, work: float) -> float:
        """Expected cost to finish ``work`` on spot in ``z`` (already launched), with ``slack``
        left to absorb preemptions; what they cannot absorb goes to on-demand."""
        if work <= 0:
            return 0.0
        if slack < obs.step_h - 1e-9 or z.spot_price is None:
            return INF
        R, L = obs.restart_overhead_h, obs.expected_loss_h
        per = R + L
        lam = self.hazard(z, obs.now_h, min(work, self.horizon_h))
        room = (slack - obs.step_h) / per if per > 0 else INF
        k = 10_000 if room >= 10_000 else int(room)  # no deadline: slack is infinite
        od_work, p_need = ondemand_share(lam, work, k)
        spot_work = work - od_work
        od = self._od_price(obs)
        return z.spot_price * spot_work * (1.0 + lam * per) + od * (od_work + R * p_need)

    def launch_cost(self, obs: Observation, z: ZoneView, slack: float, work: float) -> float:
        """Launch spot in ``z`` now (paying the overhead, and egress if it is another region)."""
        if z.spot_price is None:
            return INF
        R = obs.restart_overhead_h
        cost = z.spot_price * R + self.spot_run_cost(obs, z, slack - R, work)
        if obs.home_region is not None and z.region != obs.home_region:
            cost += obs.move_cost_usd
        return cost

    def proven(self, obs: Observation, z: ZoneView) -> bool:
        """Capacity that has lasted long enough that a launch there is unlikely to be wasted:
        the expected waste per running hour, hazard x (overhead + loss), is small."""
        waste = self.hazard(z, obs.now_h) * (obs.restart_overhead_h + obs.expected_loss_h)
        return waste <= self.waste_ok

    @staticmethod
    def _od_price(obs: Observation) -> float:
        best = obs.cheapest_ondemand()
        return best.ondemand_price if best and best.ondemand_price is not None else INF

    # ------------------------------------------------------------------ decision
    def decide(self, obs: Observation) -> Decision:
        self.observe(obs.now_h, obs.zones)
        if self.final_ondemand or ondemand_needed(obs):
            self.final_ondemand = True
            return ondemand_decision(obs)
        R, L, W = obs.restart_overhead_h, obs.expected_loss_h, obs.remaining_h
        cur = obs.current
        on_od = cur is not None and cur.kind == "ondemand"
        # Slack in "idle" terms: time to spare if the job launched on-demand right now.
        s_idle = slack_h(obs) - (R - obs.overhead_left_h if on_od else 0.0)
        od = self._od_price(obs)

        usable = [z for z in obs.zones if z.spot_price is not None and not z.in_cooldown]
        up = [z for z in usable if z.available] or [z for z in usable if z.available is None]
        costs = {z.key: self.launch_cost(obs, z, s_idle, W) for z in up}
        ranked = sorted(up, key=lambda z: costs[z.key])
        best = ranked[0] if ranked else None
        proven = [z for z in ranked if self.proven(obs, z)]
        keep = 1.0 - self.move_gain

        if cur is not None and cur.kind == "spot":
            here = obs.zone(cur.zone or "")
            if here is None or here.spot_price is None:
                return cur
            stay = here.spot_price * obs.overhead_left_h + self.spot_run_cost(
                obs, here, s_idle - obs.overhead_left_h, W
            )
            # Move only for a real price gain (not on statistical noise) that pays the move.
            for z in proven:
                if z.key != cur.zone and z.spot_price < here.spot_price * keep and costs[z.key] < stay * keep:
                    return Decision.spot(z.key)
            return cur  # a running spot instance makes progress at the spot price: keep it

        if on_od:
            # On on-demand the slack stands still, so wait for a zone that has proven itself.
            stay = od * (obs.overhead_left_h + W)
            if proven and costs[proven[0].key] < stay * keep:
                return Decision.spot(proven[0].key)
            return cur  # type: ignore[return-value]

        # Idle. Waiting is free while the slack left afterwards still covers coming back
        # to spot from an on-demand bridge (a launch, a loss, the step); past that, bridge.
        spare = s_idle - obs.step_h - (self.reserve_launches * R + L + obs.step_h)
        od_all = od * (R + W)
        if best is not None and costs[best.key] <= od_all:
            return Decision.spot(best.key)
        if spare > 0:
            return Decision.wait()
        return ondemand_decision(obs)
