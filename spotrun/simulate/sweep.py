"""Run many jobs (work x deadline slack x start time) over one market, for every policy.

This is what ``scripts/bench_policies.py`` and ``spotrun simulate --plot`` use to compare
policies on average rather than on one lucky start time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from spotrun.policies import make_policy
from spotrun.simulate.engine import SimResult, run
from spotrun.simulate.model import JobModel, Market
from spotrun.simulate.offline import OfflineResult, offline_bound


@dataclass
class CaseResult:
    """Every policy and the offline bound on one job starting at one tick."""

    work_h: float
    slack: float
    start_tick: int
    results: dict[str, SimResult]
    bound: OfflineResult | None


@dataclass
class PolicySummary:
    policy: str
    cases: int = 0
    mean_cost_ratio: float = 0.0
    deadlines_met: int = 0
    bound_feasible: int = 0
    missed_where_bound_met: int = 0
    mean_gap: float = 0.0  # mean of cost / bound - 1 over cases where both are finite
    preemptions: float = 0.0
    zone_moves: float = 0.0
    ratios: list[float] = field(default_factory=list)


def start_ticks(market: Market, span_ticks: int, count: int) -> list[int]:
    """``count`` start ticks spread evenly so that a job's deadline stays inside the trace."""
    last = max(0, market.ticks - span_ticks)
    if count <= 1 or last == 0:
        return [0]
    count = min(count, last + 1)
    return sorted({round(i * last / (count - 1)) for i in range(count)})


def deadline_for(work_h: float, slack: float, overhead_h: float) -> float:
    """Deadline for a job with ``slack`` x work of spare time (never below work + one launch)."""
    return max(work_h * (1.0 + slack), work_h + overhead_h + 1e-6)


def run_case(
    market: Market,
    job: JobModel,
    start: int,
    policies: Sequence[str],
    *,
    bound: bool = True,
    cap_factor: float = 3.0,
) -> CaseResult:
    """Every policy on ``job`` starting at tick ``start``. A policy sees nothing of the market
    before or beyond its own attempts (spotrun.policies.observe)."""
    horizon = job.deadline_h if job.deadline_h is not None else job.work_h + job.restart_overhead_h
    span = int(math.ceil(cap_factor * horizon / market.gap_h)) + 1
    win = market.window(start, span)
    results = {p: run(make_policy(p), win, job, cap_factor=cap_factor) for p in policies}
    ob = offline_bound(win, job, cap_factor=cap_factor) if bound else None
    slack = (job.deadline_h / job.work_h - 1.0) if job.deadline_h else math.inf
    return CaseResult(job.work_h, slack, start, results, ob)


def run_grid(
    market: Market,
    base: JobModel,
    works: Iterable[float],
    slacks: Iterable[float],
    policies: Sequence[str],
    *,
    starts: int = 8,
    bound: bool = True,
) -> list[CaseResult]:
    out = []
    for w in works:
        for s in slacks:
            # An infinite slack is a job without a deadline.
            deadline = None if math.isinf(s) else deadline_for(w, s, base.restart_overhead_h)
            job = replace(base, work_h=w, deadline_h=deadline)
            span = int(math.ceil((deadline if deadline is not None else 2 * w) / market.gap_h))
            for st in start_ticks(market, span, starts):
                out.append(run_case(market, job, st, policies, bound=bound))
    return out


def summarize(cases: Sequence[CaseResult], policies: Sequence[str]) -> dict[str, PolicySummary]:
    out: dict[str, PolicySummary] = {}
    for p in policies:
        s = PolicySummary(policy=p)
        gaps, pre, mov = [], [], []
        for c in cases:
            r = c.results[p]
            s.cases += 1
            s.ratios.append(r.cost_ratio)
            s.deadlines_met += r.deadline_met
            pre.append(r.preemptions)
            mov.append(r.zone_moves)
            if c.bound is not None and c.bound.feasible:
                s.bound_feasible += 1
                if not r.deadline_met:
                    s.missed_where_bound_met += 1
                gaps.append(r.cost / c.bound.cost - 1.0)
        s.mean_cost_ratio = statistics.fmean(s.ratios) if s.ratios else math.nan
        s.mean_gap = statistics.fmean(gaps) if gaps else math.nan
        s.preemptions = statistics.fmean(pre) if pre else 0.0
        s.zone_moves = statistics.fmean(mov) if mov else 0.0
        out[p] = s
    return out


def bound_summary(cases: Sequence[CaseResult]) -> tuple[float, int]:
    """Mean cost ratio of the offline bound (over feasible cases) and how many were feasible."""
    vals = [c.bound.cost_ratio for c in cases if c.bound is not None and c.bound.feasible]
    return (statistics.fmean(vals) if vals else math.nan), len(vals)
