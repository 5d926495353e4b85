"""`spotrun offers`, `spotrun plan` and `spotrun catalog …`: the market and the planner on the command line.

The lead's cli.py registers these: `app.command()(offers)`, `app.command("plan")(plan)` and
`app.add_typer(catalog_app, name="catalog")`. Importing this module is cheap (typer only);
rich, the catalog, the planner and the spec parser are imported inside the commands.

Exit codes: 0 ok; 2 bad input (spec, flags); 3 nothing fits (plan); 4 only the budget or deadline rules
every offer out; 1 a refresh that updated nothing.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer
    from spotrun.planner import Candidate, Plan

EXIT_BAD_INPUT = 2
EXIT_NOTHING_FITS = 3
EXIT_BUDGET = 4  # offers fit, but every one misses the budget or deadline
EXIT_REFRESH_FAILED = 1  # no provider could be refreshed (each kept its previous data)

catalog_app = typer.Typer(help="The offline price and interruption catalog: refresh it, see what it holds.")


class SortBy(StrEnum):
    price = "price"
    expected = "expected"
    interruption = "interruption"


def _consoles() -> tuple[Any, Any]:
    """stdout and stderr consoles: the terminal's width, or wide enough that nothing is cut when piped."""
    from spotrun.cli.output import console

    return console(), console(stderr=True)


def _fail(message: str, code: int = EXIT_BAD_INPUT, json_out: bool = False) -> typer.Exit:
    from spotrun.cli.output import fail

    return fail(message, code, json_out=json_out)


def escape(text: Any) -> str:
    from spotrun.cli.output import escape as _escape

    return _escape(text)


def Text(text: Any) -> Any:  # noqa: N802 - stands for rich.text.Text, imported late
    from rich.text import Text as _Text

    return _Text(str(text))


def _money(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    return f"${x:,.2f}" if x >= 100 else f"${x:.{digits}f}"


def _print_json(data: Any) -> None:
    from spotrun.cli.output import print_json

    print_json(data)


# --------------------------------------------------------------------------- offers


def _local_offers(market: Path | None = None) -> list[Offer]:
    from spotrun.clouds import get_provider

    provider = get_provider("local", **({"market": market} if market else {}))
    return provider.market_offers()  # type: ignore[attr-defined]


def _offer_filter(
    offer: Offer,
    *,
    gpu: str | None,
    min_memory: float | None,
    count: int | None,
    regions: list[str],
    spot: bool | None,
    max_price: float | None,
) -> bool:
    from fnmatch import fnmatchcase

    if gpu is not None and offer.gpu != gpu:
        return False
    if min_memory is not None and offer.gpu_memory_gb < min_memory * 0.95:
        return False
    if count is not None and offer.gpu_count != count:
        return False
    if regions and not any(fnmatchcase(offer.region, g) or fnmatchcase(offer.zone, g) for g in regions):
        return False
    price = offer.ondemand_price if spot is False else offer.spot_price
    if spot is not None and price is None:
        return False
    if max_price is not None:
        shown = price if spot is not None else (offer.spot_price or offer.ondemand_price)
        if shown is None or shown > max_price:
            return False
    return True


def _expected_per_work_hour(offers: list[Offer], spot: bool | None) -> dict[str, Candidate]:
    """Expected cost of one hour of A100-equivalent work on each offer, preemptions included.

    Uses the planner with a one-GPU-hour job and the default checkpoint assumptions, so it ranks
    different GPUs and interruption rates on one scale.
    """
    from spotrun.planner import plan

    best: dict[str, Candidate] = {}
    by_count: dict[int, list[Offer]] = {}
    for o in offers:
        by_count.setdefault(o.gpu_count, []).append(o)
    for count, group in by_count.items():
        query = SimpleNamespace(
            resources=SimpleNamespace(
                gpu=SimpleNamespace(name=None, count=count, memory=None) if count else None,
                spot="auto" if spot is None else spot,
            ),
            workload=SimpleNamespace(hours=1.0),
        )
        for c in plan(query, group).candidates:
            if c.offer.key not in best:
                best[c.offer.key] = c  # candidates are ranked: the first one per offer is the better way
    return best


def offers(
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU model, e.g. A100, H100, T4, A100-80GB.")] = None,
    min_gpu_memory: Annotated[float | None, typer.Option("--min-gpu-memory", help="Minimum GB per GPU.", min=0)] = None,
    count: Annotated[int | None, typer.Option("--count", help="GPUs per instance.", min=1)] = None,
    provider: Annotated[
        list[str] | None, typer.Option("--provider", help="aws, gcp, azure or local (repeatable).")
    ] = None,
    region: Annotated[
        list[str] | None, typer.Option("--region", help="Region or zone glob, e.g. 'us-*' (repeatable).")
    ] = None,
    spot: Annotated[
        bool | None, typer.Option("--spot/--on-demand", help="Only offers with a spot / on-demand price.")
    ] = None,
    max_price: Annotated[float | None, typer.Option("--max-price", help="Max USD per instance-hour.", min=0)] = None,
    sort: Annotated[SortBy, typer.Option("--sort", help="price, expected (cost of work) or interruption.")] = (
        SortBy.price
    ),
    limit: Annotated[int, typer.Option("--limit", "-n", help="Rows to show (0: all).", min=0)] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The market: spot and on-demand prices and interruption rates, per zone and instance type."""
    from spotrun.catalog import PROVIDERS, load_offers
    from spotrun.gpus import GPU_NAMES, parse_gpu

    wanted_gpu = None
    if gpu:
        wanted_gpu, memory_in_name = parse_gpu(gpu)
        if wanted_gpu is None:
            raise _fail(f"unknown GPU {gpu!r}; known: {', '.join(GPU_NAMES)}", json_out=json_out)
        if memory_in_name is not None and min_gpu_memory is None:
            min_gpu_memory = memory_in_name
    providers = [p.lower() for p in provider or []]
    unknown = [p for p in providers if p not in (*PROVIDERS, "local")]
    if unknown:
        raise _fail(f"unknown provider {unknown[0]!r}; use one of aws, gcp, azure, local", json_out=json_out)
    clouds = [p for p in providers if p != "local"] if providers else list(PROVIDERS)
    rows = load_offers(clouds) if clouds else []
    if "local" in providers:
        rows += _local_offers()
    rows = [
        o
        for o in rows
        if _offer_filter(
            o,
            gpu=wanted_gpu,
            min_memory=min_gpu_memory,
            count=count,
            regions=region or [],
            spot=spot,
            max_price=max_price,
        )
    ]
    expected = _expected_per_work_hour(rows, spot) if sort is SortBy.expected or json_out else {}

    def price_of(o: Offer) -> float:
        p = o.ondemand_price if spot is False else (o.spot_price if o.spot_price is not None else o.ondemand_price)
        return p if p is not None else float("inf")

    if sort is SortBy.price:
        rows.sort(key=lambda o: (price_of(o), o.key))
    elif sort is SortBy.interruption:
        rows.sort(key=lambda o: (o.interruption_rate, price_of(o), o.key))
    else:
        inf = float("inf")
        rows.sort(key=lambda o: (expected[o.key].expected_cost if o.key in expected else inf, o.key))
    total = len(rows)
    shown = rows[:limit] if limit else rows
    if json_out:
        _print_json(
            {
                "total": total,
                "offers": [_offer_json(o, expected.get(o.key)) for o in shown],
            }
        )
        return
    _render_offers(shown, total, expected, sort)


def _savings(o: Offer) -> float | None:
    if o.spot_price is None or not o.ondemand_price:
        return None
    return 1.0 - o.spot_price / o.ondemand_price


def _short_source(source: str) -> str:
    """'measured:aws-spot-advisor-2025-06-28' -> 'measured (aws-spot-advisor)'; full text in --json."""
    kind, _, detail = source.partition(":")
    detail = re.sub(r"-\d{4}(-\d\d){0,2}$", "", detail)
    return f"{kind} ({detail})" if detail else kind


def _offer_json(o: Offer, c: Candidate | None) -> dict[str, Any]:
    data = o.to_dict()
    data["key"] = o.key
    data["savings"] = _savings(o)
    data["expected_cost_per_a100_hour"] = c.expected_cost if c else None
    data["expected_uses_spot"] = c.spot if c else None
    return data


def _render_offers(rows: list[Offer], total: int, expected: dict[str, Candidate], sort: SortBy) -> None:
    from rich.table import Table

    out, _ = _consoles()
    if not rows:
        out.print("no offers match (try fewer filters, or `spotrun catalog refresh`)")
        return
    table = Table(title=f"offers ({len(rows)} of {total}, by {sort.value})", title_justify="left")
    for name in ("where", "instance", "GPUs", "vCPU/RAM", "spot $/h", "on-demand $/h", "savings", "interrupts/h",
                 "source"):  # fmt: skip
        right = name.endswith("$/h") or name in ("savings", "interrupts/h", "vCPU/RAM")
        table.add_column(name, justify="right" if right else "left", no_wrap=name in ("where", "instance"))
    if expected:
        table.add_column("exp. $/A100-h", justify="right")
    for o in rows:
        s = _savings(o)
        cells = [
            f"{o.provider}/{o.location}",
            o.instance_type,
            f"{o.gpu_count}× {o.gpu} {o.gpu_memory_gb:g}G" if o.gpu else "—",
            f"{o.vcpus:g}/{o.memory_gb:.0f}",
            _money(o.spot_price),
            _money(o.ondemand_price),
            f"{s:.0%}" if s is not None else "—",
            f"{o.interruption_rate:.3f}",
            _short_source(o.interruption_source),
        ]
        if expected:
            c = expected.get(o.key)
            cells.append(_money(c.expected_cost) if c else "—")
        table.add_row(*(Text(c) for c in cells))  # market files are user data: never markup
    out.print(table)


# --------------------------------------------------------------------------- plan


def _spec_offers(spec: Any) -> list[Offer]:
    """The offers a spec may use: the local market's and the catalog's for the clouds it names."""
    from spotrun.catalog import PROVIDERS, load_offers

    names = list(spec.resources.providers or ["local"])
    rows: list[Offer] = []
    if "local" in names:
        market = spec.local.market if getattr(spec, "local", None) is not None else None
        rows += _local_offers(market)
    clouds = [n for n in names if n in PROVIDERS]
    if clouds:
        rows += load_offers(clouds)
    return rows


def plan(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="The job spec (YAML).")],
    limit: Annotated[int, typer.Option("--limit", "-n", help="Candidates to show.", min=1)] = 5,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What spotrun would run the job on, and what it expects that to cost, before spending a cent."""
    from spotrun import planner
    from spotrun.cli.specs import load_spec_or_exit

    spec = load_spec_or_exit(spec_path, json_out=json_out)  # with the config's defaults, as launch reads it
    offers = _spec_offers(spec)
    result = planner.plan(spec, offers)
    from spotrun.cli import remote

    host = remote.controller_host_estimate(spec, offers)  # None under `controller: local`
    if json_out:
        data = result.to_dict()
        data["candidates"] = data["candidates"][:limit]
        data["chosen"] = data["candidates"][0] if data["candidates"] else None
        data["total_candidates"] = len(result.candidates)
        if host is not None:
            data["controller_host"] = host
        _print_json(data)
    else:
        _render_plan(result, limit, spec_path)
        remote.say_controller_host(host)
    if not result.candidates:
        raise typer.Exit(_nothing_fits_code(spec, result, json_out))


def _nothing_fits_code(spec: Any, result: Plan, json_out: bool) -> int:
    """3 when no offer has the resources; 4 when offers fit but every one misses the budget or
    deadline. Without a runtime in the spec the estimate is a guess: 0, the launch is not refused
    (the limits are enforced while the job runs)."""
    from spotrun.control.planning import runtime_known

    if not result.near_misses:
        return EXIT_NOTHING_FITS
    if runtime_known(spec):
        return EXIT_BUDGET
    if not json_out:
        _, err = _consoles()
        err.print(
            "the spec gives no runtime (workload.hours), so these estimates are guesses: "
            "`spotrun launch` runs it and enforces the budget and deadline as it goes",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return 0


def _render_plan(result: Plan, limit: int, spec_path: Path) -> None:
    from rich.table import Table

    out, err = _consoles()
    for note in result.notes:
        out.print(f"[dim]assumption:[/] {escape(note)}", highlight=False)
    if not result.candidates:
        err.print(f"no offer fits {spec_path}: {result.explain_empty()}", markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(
        title=f"top {min(limit, len(result.candidates))} of {len(result.candidates)} candidates "
        f"(of {result.offers_considered} offers), by expected total cost",
        title_justify="left",
    )
    for name in ("#", "where", "instance", "GPUs", "buy", "$/h", "interrupts/h", "exp. hours", "exp. preempts",
                 "exp. cost"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("where", "instance", "GPUs", "buy") else "right")
    for i, c in enumerate(result.candidates[:limit], 1):
        o = c.offer
        table.add_row(
            str(i),
            Text(f"{o.provider}/{o.location}"),
            Text(o.instance_type),
            (f"{o.gpu_count}× {o.gpu}" if o.gpu else "—") + (f" × {c.nodes} nodes" if c.nodes > 1 else ""),
            "spot" if c.spot else "on-demand",
            _money(c.hourly_price),
            f"{o.interruption_rate * c.nodes:.3f}" if c.spot else "0",
            f"{c.expected_hours:.2f}",
            f"{c.expected_preemptions:.2f}",
            _money(c.expected_cost, 2),
            style="bold" if i == 1 else None,
        )
    out.print(table)
    best = result.candidates[0]
    o = best.offer
    out.print(
        f"[bold]chosen:[/] {escape(o.provider)}/{escape(o.location)} {escape(o.instance_type)} "
        f"({'spot' if best.spot else 'on-demand'}, {_money(best.hourly_price)}/h, "
        f"interruption rate {o.interruption_rate * best.nodes:.3f}/h from {escape(o.interruption_source)}"
        + (f", {best.nodes} nodes)" if best.nodes > 1 else ")"),
        highlight=False,
    )
    lines = [
        f"  compute   {_money(best.breakdown['compute'], 2):>12}   {best.base_hours:.2f} h of work",
        f"  restarts  {_money(best.breakdown['restarts'], 2):>12}   {best.expected_preemptions:.2f} preemptions × "
        f"{best.hours_lost_per_preemption * 60:.1f} min lost each"
        + ("" if best.final_save_fits else " (no final save fits in the notice)"),
        f"  storage   {_money(best.breakdown['storage'], 2):>12}",
        f"  egress    {_money(best.breakdown['egress'], 2):>12}",
        f"  total     {_money(best.expected_cost, 2):>12}   finishing after ~{best.finish_hours:.2f} h",
    ]
    for line in lines:
        out.print(line, highlight=False, markup=False)
    base = result.ondemand_baseline
    if base is not None:
        saved = 1.0 - best.expected_cost / base.expected_cost if base.expected_cost > 0 else 0.0
        out.print(
            f"on-demand equivalent: {_money(base.expected_cost, 2)} on {base.offer.provider}/{base.offer.location} "
            f"{base.offer.instance_type} ({base.expected_hours:.2f} h); the plan expects {saved:.0%} less",
            highlight=False,
            markup=False,
        )


# --------------------------------------------------------------------------- catalog


@catalog_app.command("refresh")
def refresh(
    provider: Annotated[
        list[str] | None, typer.Option("--provider", help="aws, gcp or azure (repeatable; default all).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Update the local catalog from the providers' own price APIs (keeps the old data on failure)."""
    from spotrun.catalog import PROVIDERS
    from spotrun.catalog.refresh import refresh as run_refresh

    providers = [p.lower() for p in provider or PROVIDERS]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise _fail(f"unknown provider {unknown[0]!r}; use one of {', '.join(PROVIDERS)}", json_out=json_out)
    results = run_refresh(providers)
    if json_out:
        _print_json([r.to_dict() for r in results])
    else:
        out, err = _consoles()
        for r in results:
            if r.ok:
                out.print(f"[green]ok[/] {r.provider}: {r.rows} offers updated -> {escape(r.path)}", highlight=False)
            else:
                err.print(f"[red]failed[/] {r.provider}: kept the previous catalog", highlight=False)
            for w in r.warnings:
                out.print(f"  [yellow]warning[/] {escape(w)}", highlight=False, markup=True)
            for e in r.errors:
                err.print(f"  {e}", markup=False, highlight=False, soft_wrap=True)
    if not any(r.ok for r in results):
        raise typer.Exit(EXIT_REFRESH_FAILED)


@catalog_app.command("info")
def info(json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """What the catalog holds: rows per provider, where they come from, when they were observed."""
    from spotrun.catalog import BUNDLED, PROVIDERS, load_offers, refreshed_path

    data: dict[str, Any] = {"bundled": str(BUNDLED), "providers": {}}
    for p in PROVIDERS:
        rows = load_offers([p])
        cache = refreshed_path(p)
        data["providers"][p] = {
            "offers": len(rows),
            "refreshed_file": str(cache) if cache.is_file() else None,
            "observed": sorted({o.observed for o in rows if o.observed})[-3:],
            "measured_interruption": sum(1 for o in rows if o.interruption_source.startswith("measured")),
        }
    if json_out:
        _print_json(data)
        return
    out, _ = _consoles()
    out.print(f"bundled snapshot: {BUNDLED}", highlight=False, markup=False)
    for p, d in data["providers"].items():
        where = f"refreshed: {d['refreshed_file']}" if d["refreshed_file"] else "bundled only"
        out.print(
            f"{p:6} {d['offers']:5} offers, {d['measured_interruption']} with measured interruption rates, "
            f"observed {', '.join(d['observed'])} ({where})",
            highlight=False,
            markup=False,
        )
