"""`spotrun cost`: spend across jobs, per job and per provider, against the same hours on demand."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from spotrun.cli.jobs import JSON, has_labels, open_state, parse_labels
from spotrun.cli.output import console, fail, print_json


def cost(
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="Only jobs with KEY=VALUE.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only jobs created within this long (e.g. 30d).")] = None,
    json_out: JSON = False,
) -> None:
    """Spend across jobs: what each job and each provider cost, against the same hours on demand."""
    from spotrun.spec import units

    labels = parse_labels(label)
    cutoff = 0.0
    if since is not None:
        try:
            cutoff = time.time() - units.parse_duration_s(since)
        except ValueError as e:
            raise fail(f"--since {since!r}: {e}", json_out=json_out) from None
    state = open_state()
    now = time.time()
    jobs_out: list[dict[str, Any]] = []
    providers: dict[str, dict[str, Any]] = {}
    for j in state.jobs(None):
        if j.created_at < cutoff or not has_labels(j, labels):
            continue
        spent = 0.0
        ondemand: float | None = 0.0
        for a in state.attempts(j.id):
            c, od = a.cost_at(now), a.ondemand_cost_at(now)
            spent += c
            ondemand = None if ondemand is None or od is None else ondemand + od
            p = providers.setdefault(a.provider, {"provider": a.provider, "spent_usd": 0.0, "ondemand_usd": 0.0})
            p["spent_usd"] += c
            p["ondemand_usd"] = None if p["ondemand_usd"] is None or od is None else p["ondemand_usd"] + od
        jobs_out.append(
            {
                "job_id": j.id,
                "name": j.name,
                "status": j.status.value,
                "spent_usd": round(spent, 6),
                "ondemand_usd": None if ondemand is None else round(ondemand, 6),
            }
        )
    total = sum(r["spent_usd"] for r in jobs_out)
    od_values = [r["ondemand_usd"] for r in jobs_out]
    total_od = None if any(v is None for v in od_values) else sum(od_values)  # type: ignore[arg-type]
    for p in providers.values():
        p["spent_usd"] = round(p["spent_usd"], 6)
        p["ondemand_usd"] = None if p["ondemand_usd"] is None else round(p["ondemand_usd"], 6)
    data = {
        "jobs": jobs_out,
        "providers": sorted(providers.values(), key=lambda p: p["provider"]),
        "total_spent_usd": round(total, 6),
        "total_ondemand_usd": None if total_od is None else round(total_od, 6),
    }
    if json_out:
        print_json(data)
        return
    from spotrun.cli import views

    console().print(views.cost_tables(data))
