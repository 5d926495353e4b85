"""`spotrun simulate`: what each relaunch policy would have cost on real spot history.

The lead registers it with ``app.command()(cli_simulate.simulate)``. Cheap to import: the
simulator, numpy and matplotlib load only when the command runs (matplotlib only with --plot).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_BAD_INPUT = 2
DEFAULT_RESTART_OVERHEAD_H = 0.2


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _job_from_spec(spec_path: Path | None) -> dict[str, Any]:
    """Work hours, deadline, checkpoint interval and size from a job spec (all optional)."""
    if spec_path is None:
        return {}
    from spotrun.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    out: dict[str, Any] = {}
    if spec.deadline is not None:
        out["deadline_h"] = spec.deadline / 3600.0
    wl = spec.workload
    if wl is not None:
        if wl.hours is not None:
            out["work_h"] = wl.hours
        if wl.checkpoint_gb is not None:
            out["checkpoint_gb"] = wl.checkpoint_gb
    if spec.checkpoint.interval is not None:
        out["checkpoint_interval_h"] = spec.checkpoint.interval / 3600.0
    return out


def default_trace() -> Path:
    """The trace bundled with spotrun (3 zones of real GCP H100 spot availability; see
    spotrun/traces/PROVENANCE.md), used when no --trace is given."""
    return Path(__file__).resolve().parent.parent / "traces" / "gcp-h100"


def simulate(
    spec_path: Annotated[
        Path | None, typer.Argument(help="Job spec (work hours, deadline, checkpointing); flags override it.")
    ] = None,
    trace: Annotated[
        list[Path] | None,
        typer.Option(
            "--trace",
            "-t",
            help="Trace file or folder (repeatable; default: the bundled GCP H100 trace); every zone is a market zone.",
        ),
    ] = None,
    policy: Annotated[
        list[str] | None, typer.Option("--policy", "-p", help="Policy to replay (repeatable; default: all).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG: cost vs deadline slack, and where the job ran.")
    ] = None,
    work_hours: Annotated[float | None, typer.Option("--work-hours", help="Hours of compute the job needs.")] = None,
    deadline_hours: Annotated[
        float | None, typer.Option("--deadline-hours", help="Deadline, hours after the start.")
    ] = None,
    restart_overhead: Annotated[
        float | None,
        typer.Option("--restart-overhead", help="Hours every launch pays before progress (provision + restore)."),
    ] = None,
    checkpoint_interval: Annotated[
        float | None, typer.Option("--checkpoint-interval", help="Hours of progress between checkpoints.")
    ] = None,
    notice_save: Annotated[
        bool,
        typer.Option(
            "--notice-save/--no-notice-save",
            help="Whether the save on the preemption notice works (else a preemption loses the "
            "work since the last checkpoint).",
        ),
    ] = True,
    price: Annotated[
        float | None,
        typer.Option("--price", help="Spot USD/h per instance, for zones whose trace has no prices."),
    ] = None,
    ondemand_price: Annotated[
        float | None,
        typer.Option("--ondemand-price", help="On-demand USD/h per instance, for zones whose trace has none."),
    ] = None,
    nodes: Annotated[
        int,
        typer.Option(
            "--nodes",
            min=1,
            help="Instances needed at once: count-valued traces are available when at "
            "least this many could be had, and every price is paid this many times.",
        ),
    ] = 1,
    start_hour: Annotated[
        float, typer.Option("--start-hour", help="Start the job this many hours into the trace.", min=0)
    ] = 0.0,
    checkpoint_gb: Annotated[
        float | None, typer.Option("--checkpoint-gb", help="Checkpoint size, for egress between regions.")
    ] = None,
    egress_per_gb: Annotated[float, typer.Option("--egress-per-gb", help="USD per GB between regions.")] = 0.02,
    bound: Annotated[bool, typer.Option("--bound/--no-bound", help="Also compute the offline lower bound.")] = True,
) -> None:
    """Replay real spot history: what each relaunch policy would have cost, and whether it met the deadline."""
    from spotrun.policies import POLICIES

    if not trace:
        trace = [default_trace()]
    names = policy or list(POLICIES)
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise _fail(f"unknown policy {', '.join(unknown)}; known: {', '.join(POLICIES)}")
    _check_finite(
        {
            "--work-hours": work_hours,
            "--deadline-hours": deadline_hours,
            "--restart-overhead": restart_overhead,
            "--checkpoint-interval": checkpoint_interval,
            "--price": price,
            "--ondemand-price": ondemand_price,
            "--start-hour": start_hour,
            "--checkpoint-gb": checkpoint_gb,
            "--egress-per-gb": egress_per_gb,
        }
    )
    if work_hours is not None and work_hours <= 0:
        raise _fail(f"--work-hours must be more than 0, got {work_hours:g}")
    job_kw = _job_from_spec(spec_path)
    if work_hours is not None:
        job_kw["work_h"] = work_hours
    if deadline_hours is not None:
        job_kw["deadline_h"] = deadline_hours
    if checkpoint_interval is not None:
        job_kw["checkpoint_interval_h"] = checkpoint_interval
    if checkpoint_gb is not None:
        job_kw["checkpoint_gb"] = checkpoint_gb
    if "work_h" not in job_kw:
        raise _fail("how long does the job run? set workload.hours in the spec or pass --work-hours")
    job_kw["restart_overhead_h"] = DEFAULT_RESTART_OVERHEAD_H if restart_overhead is None else restart_overhead
    job_kw["notice_save"] = notice_save
    job_kw["egress_usd_per_gb"] = egress_per_gb

    from spotrun.simulate.engine import run
    from spotrun.simulate.model import JobModel, Market
    from spotrun.simulate.traces import TraceFormatError, load_traces

    try:
        zones = load_traces(trace, nodes=nodes)
    except (OSError, TraceFormatError, ValueError) as e:
        raise _fail(str(e)) from None
    if not zones:
        raise _fail("the traces hold no zones")
    try:
        job = JobModel(**job_kw)
        market = Market.from_traces(zones, spot_price=price, ondemand_price=ondemand_price, scale=nodes)
    except ValueError as e:
        raise _fail(str(e)) from None
    start_tick = int(round(start_hour / market.gap_h))
    if start_tick >= market.ticks:
        raise _fail(f"--start-hour {start_hour} is past the end of the traces ({market.ticks * market.gap_h:.1f} h)")

    from spotrun.policies import make_policy
    from spotrun.simulate.offline import offline_bound
    from spotrun.simulate.report import results_json, results_table

    results = [run(make_policy(p), market, job, start_tick=start_tick) for p in names]
    ob = offline_bound(market.window(start_tick, market.ticks - start_tick), job) if bound else None
    sources = sorted({z.source for z in zones})
    if plot is not None:
        _write_plot(plot, market, job, names, start_tick, results)
    if json_out:
        data = results_json(results, ob, job, market, start_tick=start_tick, sources=sources)
        if plot is not None:
            data["plot"] = str(plot)
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 1000)  # piped: never cut a column
    dl = "no deadline" if job.deadline_h is None else f"deadline {job.deadline_h:g} h"
    title = (
        f"{job.work_h:g} h of work, {dl}, restart {job.restart_overhead_h:g} h, "
        f"{len(market.zones)} zone(s) from {', '.join(sources)}"
    )
    console.print(results_table(results, ob, title=title))
    console.print(f"on-demand reference: ${market.ondemand_reference(job):,.2f} (cheapest on-demand zone, one launch)")
    from spotrun.policies import policy_sees
    from spotrun.policies.observe import OBSERVATION_MODEL
    from spotrun.simulate.report import OFFLINE_SEES

    console.print(f"What the policies were allowed to see: {OBSERVATION_MODEL}", highlight=False)
    for p in names:
        console.print(f"  {p}: {policy_sees(p)}", highlight=False)
    if ob is not None:
        console.print(f"  offline bound: {OFFLINE_SEES}", highlight=False)
    if plot is not None:
        console.print(f"plot written to {plot}")


def _write_plot(path: Path, market: Any, job: Any, names: list[str], start_tick: int, results: list) -> None:
    from spotrun.simulate.report import plot, slack_curve
    from spotrun.simulate.sweep import start_ticks

    span = int(job.work_h * 2.5 / market.gap_h) + 1
    starts = sorted({start_tick, *start_ticks(market, span, 4)})[:5]
    curve = slack_curve(market, job, names, starts=starts)
    plot(
        path,
        results,
        curve,
        title=f"{job.work_h:g} h job on {len(market.zones)} zone(s): "
        + ", ".join(market.zones[:6])
        + (" ..." if len(market.zones) > 6 else ""),
    )


def _check_finite(values: dict[str, float | None]) -> None:
    """Every number flag is finite and not negative (`inf`/`nan` parse as floats)."""
    import math

    for flag, value in values.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise _fail(f"{flag} must be a finite number >= 0, got {value}")
