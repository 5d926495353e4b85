"""Rendering of jobs, attempts and the live launch view (rich). No logic beyond presentation.

Every cell that holds text from outside (details, reasons, event messages) is a `Text`, so it is
never read as markup; identifier columns never shrink below their longest value (no '…').
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from spotrun.control.controller import JobResult, Snapshot
    from spotrun.control.state import Attempt, Event, Job

STATUS_STYLE = {
    "SUCCEEDED": "bold green",
    "FAILED": "bold red",
    "CANCELLED": "yellow",
    "NO_CAPACITY": "bold red",
    "BUDGET_EXHAUSTED": "bold red",
    "DEADLINE_EXCEEDED": "bold red",
    "RUNNING": "cyan",
    "LAUNCHING": "cyan",
    "RECOVERING": "magenta",
    "PENDING": "dim",
}


TERMINAL_NAMES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "NO_CAPACITY", "BUDGET_EXHAUSTED", "DEADLINE_EXCEEDED"})


def _id_width(values: list[str]) -> int:
    return max((len(v) for v in values), default=1)


def money(x: float | None) -> str:
    return "—" if x is None else f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def savings(spent: float, ondemand: float | None) -> str:
    if not ondemand:
        return ""
    return f"{(1 - spent / ondemand) * 100:.0f}% less than on-demand"


def jobs_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="spotrun jobs", show_lines=False)
    ids = [r["job_id"] for r in rows]
    for col in ("JOB", "STATUS", "ATTEMPTS", "PREEMPTED", "SPENT", "ON-DEMAND", "AGE"):
        if col == "JOB":
            table.add_column(col, no_wrap=True, min_width=_id_width(ids), overflow="fold")
            continue
        if col == "STATUS":
            table.add_column(col, no_wrap=True, min_width=_id_width([r["status"] for r in rows]), overflow="fold")
            continue
        table.add_column(col, justify="right" if col in ("ATTEMPTS", "PREEMPTED", "SPENT", "ON-DEMAND") else "left")
    for r in rows:
        orphan = r["status"] not in TERMINAL_NAMES and not r.get("controller_alive", True)
        table.add_row(
            Text(r["job_id"]),
            status_text(r["status"] + (" (no controller)" if orphan else "")),
            str(r["attempts"]),
            str(r["preemptions"]),
            money(r["spent_usd"]),
            money(r["ondemand_equivalent_usd"]),
            duration(time.time() - r["created_at"]) + " ago",
        )
    return table


def attempts_table(attempts: list[Attempt], now: float) -> Table:
    table = Table(title="attempts")
    for col in ("#", "WHERE", "TYPE", "MARKET", "$/H", "RAN", "OUTCOME", "COST", "DETAIL"):
        if col in ("WHERE", "TYPE", "OUTCOME"):
            table.add_column(col, no_wrap=True, overflow="fold")
        else:
            table.add_column(col)
    for a in attempts:
        ran = None if a.started_at is None else (a.ended_at or now) - a.started_at
        table.add_row(
            str(a.n),
            Text(f"{a.provider}/{a.location}"),
            Text(a.instance_type),
            "spot" if a.spot else "on-demand",
            f"{a.hourly_price:.4f}",
            duration(ran),
            a.end_reason or ("running" if a.started_at else "launching"),
            money(a.cost_at(now)),
            Text(a.detail),
        )
    return table


def timeline(events: list[Event], start: float) -> Table:
    table = Table(title="timeline", show_header=False, box=None)
    table.add_column("t", style="dim", justify="right")
    table.add_column("event")
    for e in events:
        table.add_row("+" + duration(e.at - start), Text(e.message))
    return table


def job_detail(
    job: Job, attempts: list[Attempt], events: list[Event], spent: float, ondemand: float | None, now: float
) -> Group:
    head = Text.assemble(
        (f"{job.id}  ", "bold"),
        status_text(job.status.value),
        f"  {job.reason}" if job.reason else "",
    )
    money_line = Text(
        f"spent {money(spent)}   on-demand for the same hours {money(ondemand)}   {savings(spent, ondemand)}"
    )
    parts: list[Any] = [head, money_line]
    if job.job_exit_code is not None:
        parts.append(Text(f"workload exit code: {job.job_exit_code}"))
    parts += [attempts_table(attempts, now), timeline(events, job.created_at)]
    return Group(*parts)


def live_panel(snap: Snapshot) -> Panel:
    job = snap.job
    current = snap.attempts[-1] if snap.attempts else None
    lines: list[Any] = []
    head = Text.assemble(("status ", "dim"), status_text(job.status.value))
    if current is not None:
        head.append(
            f"   attempt {current.n} · {current.provider}/{current.location} · {current.instance_type} · "
            f"{'spot' if current.spot else 'on-demand'} ${current.hourly_price:.4f}/h"
        )
    lines.append(head)
    prog = (snap.heartbeat or {}).get("progress") or {}
    if prog.get("total"):
        frac = min(1.0, prog.get("step", 0) / prog["total"])
        bar = "█" * int(frac * 30) + "░" * (30 - int(frac * 30))
        lines.append(Text(f"progress {bar} {prog.get('step')}/{prog['total']} ({frac:.0%})"))
    elif snap.heartbeat:
        lines.append(Text(f"phase {snap.heartbeat.get('phase', '?')}"))
    preempted = sum(1 for a in snap.attempts if a.end_reason == "preempted")
    zones = sorted({a.location for a in snap.attempts if a.started_at is not None})
    lines.append(
        Text(
            f"spent {money(snap.spent)} (on-demand {money(snap.ondemand_equivalent)})   "
            f"preemptions {preempted}   zones {', '.join(zones) or '—'}"
        )
    )
    return Panel(Group(*lines), title=f"spotrun · {job.id}", expand=False)


def result_summary(result: JobResult, attempts: list[Attempt], extra: list[str] | None = None) -> Panel:
    zones = sorted({a.location for a in attempts if a.started_at is not None})
    lines = [
        Text.assemble(("result ", "dim"), status_text(result.status.value), f"  {result.reason}"),
        Text(
            f"attempts {result.attempts}"
            + (f" (+{result.launch_failures} launches refused)" if result.launch_failures else "")
            + f"   preemptions {result.preemptions}   zones used {len(zones)}: {', '.join(zones) or '—'}"
        ),
        Text(
            f"spent {money(result.spent)}   on-demand equivalent {money(result.ondemand_equivalent)}   "
            f"{savings(result.spent, result.ondemand_equivalent)}"
        ),
    ]
    lines += [Text(x) for x in extra or []]
    return Panel(Group(*lines), title=f"spotrun · {result.job_id}", expand=False)


def cost_tables(data: dict[str, Any]) -> Group:
    jobs = Table(title="spend per job", title_justify="left")
    ids = [r["job_id"] for r in data["jobs"]]
    jobs.add_column("JOB", no_wrap=True, min_width=_id_width(ids), overflow="fold")
    jobs.add_column("STATUS", no_wrap=True, overflow="fold")
    for col in ("SPENT", "ON-DEMAND", "SAVED"):
        jobs.add_column(col, justify="right")
    for r in data["jobs"]:
        jobs.add_row(
            Text(r["job_id"]),
            status_text(r["status"]),
            money(r["spent_usd"]),
            money(r["ondemand_usd"]),
            savings(r["spent_usd"], r["ondemand_usd"]),
        )
    providers = Table(title="spend per provider", title_justify="left")
    providers.add_column("PROVIDER", no_wrap=True)
    for col in ("SPENT", "ON-DEMAND", "SAVED"):
        providers.add_column(col, justify="right")
    for p in data["providers"]:
        providers.add_row(
            Text(p["provider"]), money(p["spent_usd"]), money(p["ondemand_usd"]),
            savings(p["spent_usd"], p["ondemand_usd"]),
        )  # fmt: skip
    total = Text(
        f"total spent {money(data['total_spent_usd'])}   on-demand for the same hours "
        f"{money(data['total_ondemand_usd'])}   {savings(data['total_spent_usd'], data['total_ondemand_usd'])}"
    )
    return Group(jobs, providers, total)
