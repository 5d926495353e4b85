"""The `spotrun` command line. It parses, calls and renders; the work is done elsewhere.

Start-up must stay cheap: nothing here imports torch or a cloud SDK at module level (a test
checks `sys.modules` after `spotrun --help` and `spotrun status`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from spotrun import __version__
from spotrun.cli import market as cli_market
from spotrun.cli import simulate as cli_simulate

if TYPE_CHECKING:
    from spotrun.control.state import State
    from spotrun.spec import JobSpec

app = typer.Typer(
    name="spotrun",
    help="Run ML training on the cheapest spot GPU that fits, across AWS, GCP and Azure, through preemptions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

EXIT_BAD_INPUT = 2


def _version(value: bool) -> None:
    if value:
        console.print(f"spotrun {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """spotrun: plan, launch and babysit training jobs on spot GPUs."""


# ---------------------------------------------------------------------------- helpers


def load_spec_or_exit(path: Path) -> JobSpec:
    from spotrun.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as e:
        err.print(str(e), markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def open_state() -> State:
    from spotrun.control.state import State

    return State.open_default()


def find_job_or_exit(state: State, ref: str) -> Any:
    try:
        return state.find_job(ref)
    except KeyError as e:
        err.print(f"error: {e.args[0]}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def controller_alive(job: Any) -> bool:
    from spotrun.pids import pid_alive

    return bool(job.controller_pid) and pid_alive(job.controller_pid)


# ---------------------------------------------------------------------------- validate


@app.command()
def validate(spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")]) -> None:
    """Check a job spec and report every problem (file, line, key, what is allowed). Exit 2 if invalid."""
    job = load_spec_or_exit(spec)
    gpu = job.resources.gpu
    want = f"{gpu.count}× {gpu.name or 'any GPU'}" if gpu else "no GPU"
    console.print(f"[green]ok[/] {spec}: job [bold]{job.name}[/], {want}")


# ---------------------------------------------------------------------------- launch


@app.command()
def launch(
    spec: Annotated[Path | None, typer.Argument(help="The job spec (YAML).")] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run the controller in the background; print the job id.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON (no live view).")] = False,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Pick up an existing job (e.g. after the controller died).")
    ] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="Store URL (file://, s3://, gs://, az://); overrides the spec.")
    ] = None,
) -> None:
    """Plan, provision, run and watch a job; relaunch on preemption; resume from the last checkpoint."""
    from spotrun.control.controller import Controller, ControllerBusy

    state = open_state()
    if resume:
        job_id = find_job_or_exit(state, resume).id
        _refuse_resume_without_secrets(state, job_id)
    else:
        if spec is None:
            err.print("error: give a job spec, or --resume JOB")
            raise typer.Exit(EXIT_BAD_INPUT)
        job_spec = load_spec_or_exit(spec)
        controller = Controller(state, store_url=store)
        if not _confirm_plan(
            controller, job_spec, yes=yes or json_out or detach or not sys.stdin.isatty(), quiet=json_out
        ):
            raise typer.Exit(1)
        job_id = controller.submit(job_spec, progress=None if json_out else _upload_progress())
    if detach:
        _spawn_detached_controller(job_id)
        if json_out:
            print_json({"job_id": job_id, "detached": True})
        else:
            console.print(f"job [bold]{job_id}[/] launched in the background")
            console.print(f"  spotrun status {job_id}    spotrun logs {job_id} -f    spotrun cancel {job_id}")
        return
    try:
        result = _run_foreground(state, job_id, live=not json_out)
    except ControllerBusy as e:
        err.print(f"error: {e}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if json_out:
        print_json(result.to_dict())
    raise typer.Exit(result.exit_code)


def _refuse_resume_without_secrets(state: State, job_id: str) -> None:
    """A `${VAR}` this shell lacks: exit 2 unless the clouds already hold the job's secret."""
    from spotrun.control.secrets import resume_refusal

    refusal = resume_refusal(state, job_id)
    if refusal:
        err.print(f"error: {refusal}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)


def _confirm_plan(controller: Any, job_spec: JobSpec, *, yes: bool, quiet: bool) -> bool:
    from spotrun.planner import plan

    offers = controller.offers_for(job_spec)
    result = plan(job_spec, offers)
    if not result.candidates:
        err.print(f"error: no offer fits this job: {result.explain_empty()}", markup=False)
        raise typer.Exit(3)
    best = result.candidates[0]
    if not quiet:
        o = best.offer
        console.print(
            f"plan: {o.provider}/{o.location} {o.instance_type} ({o.gpu_count}× {o.gpu}) "
            f"{'spot' if best.spot else 'on-demand'} ${best.hourly_price:.4f}/h, "
            f"expected ${best.expected_cost:.2f} over {best.expected_hours:.2f} h "
            f"({len(result.candidates)} candidates)"
        )
    if yes:
        return True
    return typer.confirm("launch?", default=True)


def _upload_progress() -> Any:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    def start(label: str, total: int) -> Any:
        if total < 8 * 1024 * 1024:  # only for uploads that take more than a moment
            return None
        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
        )
        progress.start()
        task = progress.add_task(f"uploading {label}", total=total)
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            progress.update(task, advance=n)
            if done[0] >= total:
                progress.stop()

        return advance

    return start


def _spawn_detached_controller(job_id: str) -> None:
    from spotrun.paths import home

    log = open(home() / f"controller-{job_id}.log", "ab")  # noqa: SIM115 - handed to the child
    subprocess.Popen(
        [sys.executable, "-m", "spotrun.control.controller", job_id],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        close_fds=True,
    )


def _run_foreground(state: State, job_id: str, *, live: bool) -> Any:
    from spotrun.cli import views
    from spotrun.control.controller import Controller

    if not live:
        try:
            return Controller(state).run(job_id)
        except KeyboardInterrupt:
            return _cancel_after_interrupt(state, job_id)
    interactive = console.is_terminal
    seen_events = [0]

    def print_new_events(snap: Any) -> None:
        for e in state.events(job_id, after_id=seen_events[0]):
            seen_events[0] = e.id
            console.print(f"[dim]{time.strftime('%H:%M:%S', time.localtime(e.at))}[/] {e.message}", highlight=False)

    controller = Controller(state)
    try:
        if interactive:
            from rich.live import Live

            with Live(console=console, refresh_per_second=4, transient=False) as view:

                def update(snap: Any) -> None:
                    print_new_events(snap)
                    view.update(views.live_panel(snap))

                controller.on_update = update
                result = controller.run(job_id)
        else:
            controller.on_update = print_new_events
            result = controller.run(job_id)
    except KeyboardInterrupt:
        result = _cancel_after_interrupt(state, job_id)
    print_new_events(None)
    console.print(views.result_summary(result, state.attempts(job_id)))
    return result


def _cancel_after_interrupt(state: State, job_id: str) -> Any:
    """Ctrl-C on a foreground launch: the job has no controller left, so cancel it and release
    its instances now rather than leave them billing."""
    from spotrun.control.controller import Controller

    err.print("interrupted: cancelling the job and releasing its instances (use --detach to keep jobs running)")
    state.request_cancel(job_id, time.time())
    state.release_controller(job_id, os.getpid())
    return Controller(state).run(job_id)


# ---------------------------------------------------------------------------- status


def _job_row(state: State, job: Any) -> dict[str, Any]:
    from spotrun.control.controller import spend

    attempts = state.attempts(job.id)
    spent, ondemand = spend(attempts, time.time())
    return {
        "job_id": job.id,
        "name": job.name,
        "status": job.status.value,
        "reason": job.reason,
        "exit_code": job.exit_code,
        "job_exit_code": job.job_exit_code,
        "attempts": sum(1 for a in attempts if a.started_at is not None),
        "preemptions": sum(1 for a in attempts if a.end_reason == "preempted"),
        "zones": sorted({a.location for a in attempts if a.started_at is not None}),
        "spent_usd": round(spent, 6),
        "ondemand_equivalent_usd": None if ondemand is None else round(ondemand, 6),
        "created_at": job.created_at,
        "ended_at": job.ended_at,
        "controller_alive": job.status.terminal or controller_alive(job),
    }


@app.command()
def status(
    job: Annotated[str | None, typer.Argument(help="A job id (or its prefix, or name). Omit for all jobs.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many jobs to list.")] = 20,
) -> None:
    """Jobs, attempts, spend vs on-demand, and the timeline of one job."""
    from spotrun.cli import views
    from spotrun.control.controller import spend

    state = open_state()
    if job is None:
        rows = [_job_row(state, j) for j in state.jobs(limit)]
        if json_out:
            print_json(rows)
        elif not rows:
            console.print("no jobs yet: try `spotrun launch configs/quickstart.yaml`")
        else:
            console.print(views.jobs_table(rows))
            for r in rows:
                if not r["controller_alive"]:
                    console.print(
                        f"[yellow]{r['job_id']} has no controller running[/]: "
                        f"resume it with `spotrun launch --resume {r['job_id']}`"
                    )
        return
    j = find_job_or_exit(state, job)
    attempts = state.attempts(j.id)
    events = state.events(j.id)
    now = time.time()
    if json_out:
        row = _job_row(state, j)
        row["attempts_detail"] = [
            {
                "n": a.n,
                "provider": a.provider,
                "region": a.region,
                "zone": a.zone,
                "instance_type": a.instance_type,
                "spot": a.spot,
                "hourly_price": a.hourly_price,
                "instance_id": a.instance_id,
                "started_at": a.started_at,
                "ended_at": a.ended_at,
                "end_reason": a.end_reason,
                "exit_code": a.exit_code,
                "detail": a.detail,
                "store_url": a.store_url or j.store_url,
                "cost_usd": round(a.cost_at(now), 6),
            }
            for a in attempts
        ]
        row["events"] = [{"at": e.at, "kind": e.kind, "message": e.message} for e in events]
        print_json(row)
        return
    spent, ondemand = spend(attempts, now)
    console.print(views.job_detail(j, attempts, events, spent, ondemand, now))
    if not j.status.terminal and not controller_alive(j):
        console.print(f"[yellow]no controller is running this job[/]: resume it with `spotrun launch --resume {j.id}`")


# ---------------------------------------------------------------------------- logs


@app.command()
def logs(
    job: Annotated[str, typer.Argument(help="A job id (or its prefix, or name).")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing, across relaunches, until the job ends.")
    ] = False,
    attempt: Annotated[int | None, typer.Option("--attempt", "-a", help="Only this attempt.")] = None,
) -> None:
    """The job's output across every attempt, in order, each attempt clearly separated."""
    from spotrun.cli.logs import LogReader

    state = open_state()
    j = find_job_or_exit(state, job)
    reader = LogReader(state, j.id, only_attempt=attempt)
    out = sys.stdout
    while True:
        for header, text in reader.poll():
            if header:
                console.rule(header, style="dim")
            if text:
                out.write(text)
                out.flush()
        if not follow or (state.job(j.id).status.terminal and reader.drained()):
            break
        time.sleep(0.5)


# ---------------------------------------------------------------------------- cancel


@app.command()
def cancel(
    job: Annotated[str, typer.Argument(help="A job id (or its prefix, or name).")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for the job's controller to stop it.")] = 30.0,
) -> None:
    """Stop a job and release every instance it holds (state CANCELLED)."""
    from spotrun.control.controller import Controller, ControllerBusy

    state = open_state()
    j = find_job_or_exit(state, job)
    if j.status.terminal:
        console.print(f"job {j.id} already ended: {j.status.value}")
        return
    state.request_cancel(j.id, time.time())
    deadline = time.time() + wait
    while controller_alive(state.job(j.id)) and time.time() < deadline:
        time.sleep(0.2)
        if state.job(j.id).status.terminal:
            break
    if not state.job(j.id).status.terminal:
        try:
            Controller(state).run(j.id)  # no live controller: do the cleanup here
        except ControllerBusy:
            pid = state.job(j.id).controller_pid
            console.print(f"cancel requested: the job's controller (pid {pid}) is stopping it")
            return
    console.print(f"job {j.id}: {state.job(j.id).status.value}")


# ---------------------------------------------------------------------------- check


@app.command()
def check(
    provider: Annotated[list[str] | None, typer.Option("--provider", "-p", help="Only these providers.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Which providers are configured and usable (credentials, region, quota hints). Launches nothing."""
    from rich.table import Table

    from spotrun.clouds import PROVIDERS, get_provider
    from spotrun.clouds.base import ProviderError

    rows = []
    for name in provider or list(PROVIDERS):
        try:
            rows.append(get_provider(name).check())
        except (ProviderError, ImportError, ValueError, TypeError) as e:
            rows.append({"provider": name, "usable": False, "detail": str(e)})
    if json_out:
        print_json(rows)
        return
    table = Table(title="providers")
    for col in ("PROVIDER", "USABLE", "DETAIL"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["provider"], "[green]yes[/]" if r["usable"] else "[red]no[/]", str(r.get("detail", "")))
    console.print(table)


# ---------------------------------------------------------------------------- market, simulate

app.command()(cli_market.offers)
app.command("plan")(cli_market.plan)
app.add_typer(cli_market.catalog_app, name="catalog", help="The bundled offer catalog and its live refresh.")
app.command("simulate")(cli_simulate.simulate)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
