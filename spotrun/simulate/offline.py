"""The offline bound: the cheapest way to finish the job by its deadline, knowing the future.

Dynamic programming over ticks x progress x (what runs, how long it has run). At each tick the
job can stay idle, keep the instance it runs (spot only while the zone has capacity), or
launch any resource (every spot zone with capacity, or on-demand at the cheapest zone);
a launch pays the restart overhead, billed, before progress. Stopping is free.

It is a *lower bound* on the cost of any policy that meets the deadline in
:func:`spotrun.simulate.engine.run` with the same restart overhead, because it relaxes the
engine and never tightens it:

* every schedule the engine can produce is a path here (same ticks, same prices, same
  capacity rule, same overhead per launch);
* it never loses work to a preemption and pays no egress;
* progress is counted in units of ``gap/K`` and a launch tick's partial progress is rounded
  *up*, so a path here is never behind the same schedule in the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spotrun.simulate.model import JobModel, Market


@dataclass(frozen=True)
class OfflineResult:
    cost: float  # inf when the deadline cannot be met at all
    feasible: bool
    ondemand_reference: float

    @property
    def cost_ratio(self) -> float:
        return self.cost / self.ondemand_reference if self.ondemand_reference else float("nan")


def _resolution(gap_h: float, overhead_h: float) -> int:
    """Sub-tick units: the smallest K (<= 12) that makes the overhead's partial tick exact."""
    frac = (overhead_h / gap_h) % 1.0
    for k in range(1, 13):
        if abs(frac * k - round(frac * k)) < 1e-6:
            return k
    return 12


def offline_bound(market: Market, job: JobModel, *, cap_factor: float = 3.0) -> OfflineResult:
    """Minimum cost to finish ``job`` on ``market`` by its deadline (no deadline: by the cap)."""
    g, R, W = market.gap_h, job.restart_overhead_h, job.work_h
    D = job.deadline_h if job.deadline_h is not None else cap_factor * (W + R)
    K = _resolution(g, R)
    delta = g / K
    P = int(math.ceil(W / delta - 1e-9))  # progress states 0..P-1 (unfinished)
    J = int(math.ceil(R / g - 1e-9))  # ticks until the overhead is paid
    Kc = max(J, 1)
    # progress (in units) and leftover overhead (hours) in the k-th tick of a segment
    orem = [min(g, max(0.0, R - k * g)) for k in range(J + 1)]
    gain_h = [g - o for o in orem]
    gain_u = [int(math.ceil(x / delta - 1e-9)) for x in gain_h]
    Z = len(market.zones)
    od_z = market.cheapest_ondemand
    od_price = market.ondemand_price[od_z]
    T = int(math.ceil(D / g - 1e-9))
    inf = math.inf
    p_h = np.arange(P) * delta  # progress hours per state (an over-estimate of the engine's)

    idle = np.full(P, inf)
    idle[0] = 0.0
    V = np.full((Z + 1, Kc, P), inf)  # V[r, k-1, p]: resource r has run k ticks
    best_final = inf

    for t in range(T):
        t0 = t * g
        room = D - t0  # time left in which to finish within this tick
        best = np.minimum(idle, V.min(axis=(0, 1)))
        newV = np.full_like(V, inf)
        for r in range(Z + 1):
            if r < Z:
                if not market.avail(r, t):
                    continue
                c = market.price(r, t)
            else:
                c = od_price
            # sources: (array, tick index within the segment) -> launch from best, or continue
            sources = [(best, 0)] + [(V[r, k - 1], k) for k in range(1, Kc + 1)]
            for arr, k in sources:
                kk = min(k, J)
                gu, o = gain_u[kk], orem[kk]
                nxt = min(k + 1, Kc) - 1
                if gu >= P:
                    fin = arr
                    fin_p = p_h
                else:
                    fin = arr[P - gu :]
                    fin_p = p_h[P - gu :]
                    cont = arr[: P - gu] + c * g
                    if room >= g - 1e-9:
                        tgt = newV[r, nxt, gu:]
                        np.minimum(tgt, cont, out=tgt)
                # finishing in this tick: pay until done (optimistic progress -> lower bound)
                need = np.minimum(g, o + np.maximum(0.0, W - fin_p))
                ok = need <= room + 1e-9
                if ok.any():
                    cand = (fin + c * need)[ok]
                    m = float(cand.min()) if cand.size else inf
                    best_final = min(best_final, m)
        idle = best
        V = newV
    ref = market.ondemand_reference(job)
    return OfflineResult(cost=best_final, feasible=math.isfinite(best_final), ondemand_reference=ref)
