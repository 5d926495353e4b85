"""Commands about jobs that exist: status, wait, logs, cancel (rm and gc: cleanup.py; cost: cost.py).

Every one takes `--json`; a job is named by its id, a unique id prefix, or a unique name (an
ambiguous name is an error listing the candidates, exit 2).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from spotrun.cli.output import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    console,
    escape,
    fail,
    plain,
    print_json,
    say,
    say_plain,
)

if TYPE_CHECKING:
    from spotrun.control.state import Job, State

JSON_HELP = 'Print JSON; errors too, as {"error": {"code", "message", "issues"}}.'
JSON = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
CONTROLLER_GONE_GRACE = 10.0  # seconds a non-finished job may have no controller before wait/logs -f give up
STORE_HELP = (
    "Read the job from this store (s3://, gs://, az://, file://) instead of this machine's state: "
    "works from any machine that can read the store. wait and logs -f start a controller here "
    "when none holds the job's lease (it adopts the running instance)."
)
STORE = Annotated[str | None, typer.Option("--store", help=STORE_HELP, metavar="URL")]


def open_state() -> State:
    import sqlite3

    from spotrun.control.state import State, StateError

    try:
        return State.open_default()
    except (StateError, sqlite3.DatabaseError, OSError) as e:
        raise fail(f"cannot open spotrun's state: {e}") from None


def find_job_or_exit(state: State, ref: str, json_out: bool = False) -> Job:
    try:
        return state.find_job(ref)
    except KeyError as e:
        raise fail(str(e.args[0]), json_out=json_out) from None


def controller_alive(job: Job) -> bool:
    """Whether a live controller drives this job (always False for a finished job)."""
    from spotrun.pids import pid_alive

    return not job.status.terminal and bool(job.controller_pid) and pid_alive(job.controller_pid)


def exit_code_of(job: Job) -> int:
    from spotrun.control.outcome import EXIT_CODES

    if job.exit_code is not None:
        return int(job.exit_code)
    return EXIT_CODES.get(job.status, EXIT_FAILED)


def parse_labels(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"--label {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def has_labels(job: Job, wanted: dict[str, str]) -> bool:
    labels = job.spec.get("labels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def job_row(state: State, job: Job) -> dict[str, Any]:
    from spotrun.control.outcome import spend

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
        "launch_failures": sum(1 for a in attempts if a.end_reason == "launch_failed"),
        "preemptions": sum(1 for a in attempts if a.end_reason == "preempted"),
        "providers": sorted({a.provider for a in attempts if a.started_at is not None}),
        "zones": sorted({a.location for a in attempts if a.started_at is not None}),
        "spent_usd": round(spent, 6),
        "ondemand_equivalent_usd": None if ondemand is None else round(ondemand, 6),
        "labels": job.spec.get("labels") or {},
        "created_at": job.created_at,
        "ended_at": job.ended_at,
        "controller_alive": controller_alive(job),
    }


# ---------------------------------------------------------------------------- status


def status(
    job: Annotated[str | None, typer.Argument(help="A job id (or its prefix, or name). Omit for all jobs.")] = None,
    json_out: JSON = False,
    limit: Annotated[
        int | None,
        typer.Option("--limit", "-n", help="Newest N jobs (0: all; default 20 in the table, all in --json).", min=0),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="Only jobs with this label KEY=VALUE.")
    ] = None,
    store: STORE = None,
) -> None:
    """Jobs, attempts, spend vs on-demand, and the timeline of one job."""
    if store is not None:
        from spotrun.cli import remote

        if job is None:
            raise fail("--store reads one job: give its id", json_out=json_out)
        remote.status(store, job, json_out)
        return
    state = open_state()
    if job is None:
        _list_jobs(state, json_out, limit, parse_labels(label))
        return
    j = find_job_or_exit(state, job, json_out)
    if not j.status.terminal and not controller_alive(j):
        from spotrun.cli import remote

        if remote.driven_elsewhere(j):  # the store's record is newer than this database
            remote.status(j.store_url, j.id, json_out)
            return
    attempts = state.attempts(j.id)
    events = state.events(j.id)
    now = time.time()
    if json_out:
        row = job_row(state, j)
        row["attempts_detail"] = attempts_detail(j, attempts, now)
        row["events"] = [{"at": e.at, "kind": e.kind, "message": e.message} for e in events]
        print_json(row)
        return
    from spotrun.cli import views
    from spotrun.control.outcome import spend

    spent, ondemand = spend(attempts, now)
    console().print(views.job_detail(j, attempts, events, spent, ondemand, now))
    if not j.status.terminal and not controller_alive(j):
        say(f"[yellow]no controller is running this job[/]: resume it with `spotrun launch --resume {escape(j.id)}`")


def attempts_detail(j: Job, attempts: list[Any], now: float) -> list[dict[str, Any]]:
    return [
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


def _list_jobs(state: State, json_out: bool, limit: int | None, labels: dict[str, str]) -> None:
    total = state.count_jobs()
    shown_limit = limit if limit is not None else (0 if json_out else 20)
    jobs = [j for j in state.jobs(None if labels else shown_limit) if has_labels(j, labels)]
    if labels:
        total = len(jobs)
        jobs = jobs[:shown_limit] if shown_limit else jobs
    rows = [job_row(state, j) for j in jobs]
    if json_out:
        print_json(rows)  # every job unless -n says otherwise
        return
    if not rows:
        say("no jobs yet: try `spotrun launch configs/quickstart.yaml`" if not total else "no jobs match")
        return
    from spotrun.cli import views

    console().print(views.jobs_table(rows))
    if total > len(rows):
        say(f"[dim]{total - len(rows)} older job(s) not shown: `spotrun status -n 0` lists all[/]")
    for r in rows:
        if r["status"] not in views.TERMINAL_NAMES and not r["controller_alive"]:
            say(
                f"[yellow]{escape(r['job_id'])} has no controller running[/]: "
                f"resume it with `spotrun launch --resume {escape(r['job_id'])}`"
            )


# ---------------------------------------------------------------------------- wait


def wait(
    job: Annotated[str, typer.Argument(help="A job id (or its prefix, or name).")],
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Give up after this many seconds (exit 1).", min=0)
    ] = None,
    json_out: JSON = False,
    store: STORE = None,
) -> None:
    """Wait until the job ends; exit with its code (0 succeeded, 1 failed, 3, 4, 130 — see README)."""
    if store is not None:
        from spotrun.cli import remote

        remote.wait(store, job, timeout, json_out)
        return
    state = open_state()
    j = find_job_or_exit(state, job, json_out)
    if not j.status.terminal and not controller_alive(j):
        from spotrun.cli import remote

        if remote.driven_elsewhere(j):  # another machine or the controller host drives it
            remote.wait(j.store_url, j.id, timeout, json_out)
            return
    final = wait_for_end(state, j.id, timeout=timeout, json_out=json_out)
    if json_out:
        print_json(job_row(state, final))
    else:
        say_plain(f"job {final.id}: {final.status.value}" + (f" ({final.reason})" if final.reason else ""))
    raise typer.Exit(exit_code_of(final))


def wait_for_end(
    state: State, job_id: str, *, timeout: float | None = None, json_out: bool = False, on_poll: Any = None
) -> Job:
    """Poll until the job is finished. Exits 1 (with a message) on timeout, or when no controller has
    driven the unfinished job for CONTROLLER_GONE_GRACE seconds (nothing would ever finish it)."""
    start = time.monotonic()
    gone_since: float | None = None
    while True:
        j = state.job(job_id)
        if on_poll is not None:
            on_poll(j)
        if j.status.terminal:
            return j
        now = time.monotonic()
        if controller_alive(j):
            gone_since = None
        else:
            gone_since = gone_since if gone_since is not None else now
            if now - gone_since >= CONTROLLER_GONE_GRACE:
                raise fail(
                    f"job {job_id} is {j.status.value} but no controller is running it: "
                    f"resume it with `spotrun launch --resume {job_id}`",
                    EXIT_FAILED,
                    json_out=json_out,
                )
        if timeout is not None and now - start >= timeout:
            raise fail(f"job {job_id} is still {j.status.value} after {timeout:g} s", EXIT_FAILED, json_out=json_out)
        time.sleep(0.3)


# ---------------------------------------------------------------------------- logs


def logs(
    job: Annotated[str, typer.Argument(help="A job id (or its prefix, or name).")],
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Keep printing, across relaunches, until the job ends; exit with its code."
        ),
    ] = False,
    attempt: Annotated[int | None, typer.Option("--attempt", "-a", help="Only this attempt (1, 2, …).")] = None,
    controller: Annotated[bool, typer.Option("--controller", help="The controller's own log instead.")] = False,
    json_out: JSON = False,
    store: STORE = None,
) -> None:
    """The job's output across every attempt, in order, each attempt clearly separated."""
    if store is not None:
        from spotrun.cli import remote

        remote.logs(store, job, follow=follow, attempt=attempt, json_out=json_out)
        return
    state = open_state()
    j = find_job_or_exit(state, job, json_out)
    if controller:
        _controller_log(j.id, json_out)
        return
    if attempt is not None:
        numbers = [a.n for a in state.attempts(j.id)]
        if attempt not in numbers:
            known = f"attempts are {numbers[0]}..{numbers[-1]}" if numbers else "it has no attempts yet"
            raise fail(f"job {j.id} has no attempt {attempt}: {known}", EXIT_BAD_INPUT, json_out=json_out)
    from spotrun.cli.logs import LogReader

    reader = LogReader(state, j.id, only_attempt=attempt)
    if json_out:
        chunks = [{"attempt": n, "text": text} for n, text in _json_chunks(reader)]
        print_json({"job_id": j.id, "status": state.job(j.id).status.value, "logs": chunks})
        return
    gone_since: float | None = None
    while True:
        print_log_chunks(reader.poll())
        if not follow:
            return
        current = state.job(j.id)
        if current.status.terminal and reader.drained():
            raise typer.Exit(exit_code_of(current))
        if not current.status.terminal and not controller_alive(current):
            gone_since = gone_since if gone_since is not None else time.monotonic()
            if time.monotonic() - gone_since >= CONTROLLER_GONE_GRACE:
                print_log_chunks(reader.poll())
                raise fail(
                    f"job {j.id} is {current.status.value} but no controller is running it: "
                    f"resume it with `spotrun launch --resume {j.id}`",
                    EXIT_FAILED,
                )
        else:
            gone_since = None
        time.sleep(0.5)


def _json_chunks(reader: Any) -> list[tuple[int | None, str]]:
    out: list[tuple[int | None, str]] = []
    current: int | None = None
    for header, text in reader.poll():
        if header:
            current = int(header.split()[1])
        if text:
            out.append((current, text))
    return out


def print_log_chunks(chunks: list[tuple[str | None, str]]) -> None:
    """Attempt headers and the workload's own output (printed as is: never markup)."""
    import sys

    out = console()
    for header, text in chunks:
        if header:
            if out.is_terminal:
                out.rule(plain(header), style="dim")
            else:
                sys.stdout.write(f"==> {header} <==\n")
        if text:
            if out.is_terminal:
                out.print(plain(text), end="", soft_wrap=True)
            else:
                sys.stdout.write(text)
    sys.stdout.flush()


def _controller_log(job_id: str, json_out: bool) -> None:
    import sys

    from spotrun.paths import home

    path = home() / f"controller-{job_id}.log"
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    if json_out:
        print_json({"job_id": job_id, "path": str(path), "text": text})
        return
    if not text:
        say_plain(f"no controller log for {job_id} (a foreground launch logs to its terminal): {path}", stderr=True)
        return
    sys.stdout.write(text)


# ---------------------------------------------------------------------------- cancel


def cancel(
    jobs: Annotated[list[str] | None, typer.Argument(help="Job ids (or prefixes, or names).")] = None,
    all_jobs: Annotated[bool, typer.Option("--all", "-a", help="Every job that has not finished.")] = False,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="Every unfinished job with KEY=VALUE.")
    ] = None,
    wait_s: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for each job's controller to stop it.")
    ] = 30.0,
    json_out: JSON = False,
    store: STORE = None,
) -> None:
    """Stop jobs and release every instance they hold (state CANCELLED)."""
    if store is not None:
        from spotrun.cli import remote

        if not jobs or all_jobs or label:
            raise fail("--store cancels jobs named by id (not --all or --label)", json_out=json_out)
        results = [remote.cancel_one(store, ref, wait_s, json_out) for ref in jobs]
        if json_out:
            print_json({"cancelled": results})
            return
        for r in results:
            say_plain(f"job {r['job_id']}: {r['status']}" + (f" ({r['note']})" if r["note"] else ""))
        return
    state = open_state()
    labels = parse_labels(label)
    if not jobs and not all_jobs and not labels:
        raise fail("give job ids, --all or --label KEY=VALUE", json_out=json_out)
    targets: dict[str, Job] = {}
    for ref in jobs or []:
        j = find_job_or_exit(state, ref, json_out)
        targets[j.id] = j
    if all_jobs or labels:
        for j in state.jobs(None):
            if not j.status.terminal and has_labels(j, labels):
                targets[j.id] = j
    results = [_cancel_one(state, j, wait_s) for j in targets.values()]
    if json_out:
        print_json({"cancelled": results})
        return
    if not results:
        say("no unfinished job matches")
    for r in results:
        say_plain(f"job {r['job_id']}: {r['status']}" + (f" ({r['note']})" if r["note"] else ""))


def _cancel_one(state: State, j: Job, wait_s: float) -> dict[str, Any]:
    from spotrun.control.controller import Controller, ControllerBusy

    if j.status.terminal:
        return {"job_id": j.id, "status": j.status.value, "note": "already ended"}
    state.request_cancel(j.id, time.time())
    deadline = time.time() + wait_s
    while controller_alive(state.job(j.id)) and time.time() < deadline:
        time.sleep(0.2)
    note = ""
    if not state.job(j.id).status.terminal:
        try:
            Controller(state).run(j.id)  # no live controller: do the cleanup here
        except ControllerBusy:
            note = f"its controller (pid {state.job(j.id).controller_pid}) is stopping it"
    return {"job_id": j.id, "status": state.job(j.id).status.value, "note": note}
