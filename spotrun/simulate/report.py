"""Tables and pictures of simulation results (rich and matplotlib are imported on use)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotrun.simulate.engine import SimResult
from spotrun.simulate.model import JobModel, Market
from spotrun.simulate.offline import OfflineResult

if TYPE_CHECKING:
    from rich.table import Table

OFFLINE_SEES = "every zone's capacity and price over the whole job, in advance (a lower bound, not a policy)"
PLOT_SLACKS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5)
KIND_COLORS = {"spot": "#2b8cbe", "ondemand": "#e34a33"}


def _fmt_h(h: float | None) -> str:
    return "-" if h is None else f"{h:.2f}"


def results_table(results: Sequence[SimResult], bound: OfflineResult | None, *, title: str = "") -> Table:
    """One row per policy: cost, cost ÷ on-demand, completion, deadline, preemptions, moves."""
    from rich.table import Table

    t = Table(title=title or None)
    for col, just in (
        ("POLICY", "left"),
        ("COST $", "right"),
        ("÷OD", "right"),
        ("DONE h", "right"),
        ("DEADLINE", "left"),
        ("PREEMPT", "right"),
        ("MOVES", "right"),
        ("SPOT h", "right"),
        ("OD h", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in results:
        met = "[green]met[/]" if r.deadline_met else "[red]missed[/]"
        if r.deadline_h is None:
            met = "-"
        t.add_row(
            r.policy,
            f"{r.cost:,.2f}",
            f"{r.cost_ratio:.3f}",
            _fmt_h(r.completion_h),
            met,
            str(r.preemptions),
            str(r.zone_moves),
            f"{r.spot_hours:.1f}",
            f"{r.ondemand_hours:.1f}",
        )
    if bound is not None:
        if bound.feasible:
            t.add_row(
                "[dim]bound[/]",
                f"[dim]{bound.cost:,.2f}[/]",
                f"[dim]{bound.cost_ratio:.3f}[/]",
                "",
                "[dim]met[/]",
                "",
                "",
                "",
                "",
            )
        else:
            t.add_row("[dim]bound[/]", "[dim]-[/]", "[dim]-[/]", "", "[red]impossible[/]", "", "", "", "")
    return t


def results_json(
    results: Sequence[SimResult],
    bound: OfflineResult | None,
    job: JobModel,
    market: Market,
    *,
    start_tick: int = 0,
    sources: Sequence[str] = (),
) -> dict[str, Any]:
    from spotrun.policies import POLICIES, policy_sees
    from spotrun.policies.observe import OBSERVATION_MODEL

    return {
        "observation_model": OBSERVATION_MODEL,
        "sees": {
            **{r.policy: policy_sees(r.policy) for r in results if r.policy in POLICIES},
            "offline_bound": OFFLINE_SEES,
        },
        "job": {
            "work_h": job.work_h,
            "deadline_h": job.deadline_h,
            "restart_overhead_h": job.restart_overhead_h,
            "checkpoint_interval_h": job.checkpoint_interval_h,
            "notice_save": job.notice_save,
            "checkpoint_gb": job.checkpoint_gb,
        },
        "market": {
            "zones": market.zones,
            "regions": market.regions,
            "tick_h": market.gap_h,
            "ticks": market.ticks,
            "start_tick": start_tick,
            "availability": market.availability(),
            "ondemand_price": market.ondemand_price,
            "sources": list(sources),
        },
        "ondemand_reference": market.ondemand_reference(job),
        "results": [r.to_dict() for r in results],
        "offline_bound": None
        if bound is None
        else {
            "cost": bound.cost if bound.feasible else None,
            "feasible": bound.feasible,
            "cost_ratio": bound.cost_ratio if bound.feasible else None,
        },
    }


def slack_curve(
    market: Market,
    job: JobModel,
    policies: Sequence[str],
    *,
    starts: Sequence[int],
    slacks: Sequence[float] = PLOT_SLACKS,
) -> dict[str, list[float]]:
    """Mean cost ÷ on-demand per policy (and ``"offline bound"``) for each deadline slack; a
    policy that missed deadlines has the count in its name."""
    from spotrun.simulate.sweep import deadline_for, run_case

    out: dict[str, list[float]] = {p: [] for p in [*policies, "offline bound"]}
    missed = dict.fromkeys(policies, 0)
    for s in slacks:
        j = replace(job, deadline_h=deadline_for(job.work_h, s, job.restart_overhead_h))
        cases = [run_case(market, j, st, policies) for st in starts]
        for p in policies:
            out[p].append(statistics.fmean(c.results[p].cost_ratio for c in cases))
            missed[p] += sum(not c.results[p].deadline_met for c in cases)
        bounds = [c.bound.cost_ratio for c in cases if c.bound is not None and c.bound.feasible]
        out["offline bound"].append(statistics.fmean(bounds) if bounds else math.nan)
    total = len(slacks) * len(starts)
    return {(f"{k} (missed {missed[k]}/{total})" if missed.get(k) else k): v for k, v in out.items()}


def plot(
    path: Path,
    results: Sequence[SimResult],
    curve: dict[str, list[float]],
    *,
    slacks: Sequence[float] = PLOT_SLACKS,
    title: str = "",
) -> Path:
    """A PNG: cost vs deadline slack per policy (left) and where the job ran (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1, 1.5]})
    xs = [s * 100 for s in slacks]
    for name, ys in curve.items():
        style = {"linestyle": "--", "color": "black"} if name == "offline bound" else {"marker": "o"}
        if "missed" in name:
            style["markerfacecolor"] = "white"
        ax1.plot(xs, ys, label=name, **style)  # type: ignore[arg-type]
    ax1.set_xlabel("deadline slack (% of the work)")
    ax1.set_ylabel("cost ÷ on-demand")
    ax1.set_title("cost vs deadline slack (mean over start times)")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)

    zones = sorted({s.zone for r in results for s in r.timeline})
    for row, r in enumerate(results):
        for seg in r.timeline:
            ax2.barh(
                row,
                seg.end_h - seg.start_h,
                left=seg.start_h,
                height=0.6,
                color=KIND_COLORS.get(seg.kind, "grey"),
                edgecolor="white",
                linewidth=0.5,
            )
            if seg.end == "preempted":
                ax2.plot(seg.end_h, row, marker="x", color="black", markersize=6)
            if len(zones) > 1 and seg.end_h - seg.start_h > 0.06 * max(1e-9, _span(results)):
                ax2.text(
                    (seg.start_h + seg.end_h) / 2, row, seg.zone, ha="center", va="center", fontsize=6, color="white"
                )
        if r.completion_h is not None:
            ax2.plot(r.completion_h, row, marker="|", color="green", markersize=14)
    dl = next((r.deadline_h for r in results if r.deadline_h is not None), None)
    if dl is not None:
        ax2.axvline(dl, color="red", linestyle=":", label="deadline")
    ax2.set_yticks(range(len(results)))
    ax2.set_yticklabels([f"{r.policy}\n{r.cost_ratio:.2f}× od" for r in results], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("hours since start")
    ax2.set_title("where the job ran (blue: spot, red: on-demand, x: preempted)")
    ax2.grid(True, axis="x", alpha=0.3)
    if dl is not None:
        ax2.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _span(results: Sequence[SimResult]) -> float:
    ends = [s.end_h for r in results for s in r.timeline]
    return max(ends) if ends else 1.0
