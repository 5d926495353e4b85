"""`spotrun launch`: plan, confirm, submit, then drive the job in the foreground (or hand it to a
detached controller), or attach to a job that already has one (`--resume` on a live job).

A foreground launch owns its job: Ctrl-C, SIGTERM (CI cancels, `timeout`) and SIGHUP (a closed
terminal) all cancel it cleanly — every instance released, state CANCELLED, exit 130. A signal
during the upload stops it and cancels a job already recorded; further signals during the cleanup
are ignored, so no instance and no job is ever left without a controller.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from spotrun.cli.jobs import JSON, controller_alive, exit_code_of, find_job_or_exit, open_state, wait_for_end
from spotrun.cli.output import (
    EXIT_BAD_INPUT,
    EXIT_BUDGET,
    EXIT_CANCELLED,
    EXIT_NO_CAPACITY,
    console,
    escape,
    fail,
    plain,
    print_json,
    say,
    say_plain,
)
from spotrun.cli.specs import Overrides, load_spec_or_exit

if TYPE_CHECKING:
    from spotrun.control.state import State
    from spotrun.spec import JobSpec

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stop:
    """Turns SIGTERM/SIGHUP into KeyboardInterrupt (what Ctrl-C raises), or holds them while
    `held` (the job is being recorded); `ignore_all()` shields the cleanup from further signals."""

    def __init__(self) -> None:
        self.held = False
        self.pending: int | None = None
        self.raised = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (*STOP_SIGNALS, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.held or self.raised:  # held: act once the job is recorded; raised: the cleanup is under way
            self.pending = signum
            return
        self.raised = True
        raise KeyboardInterrupt

    def release(self) -> None:
        """Leave the held section; raise now if a signal came in meanwhile."""
        self.held = False
        if self.pending is not None and not self.raised:
            self.raised = True
            raise KeyboardInterrupt

    def ignore_all(self) -> None:
        for sig in (*STOP_SIGNALS, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def launch(
    spec: Annotated[Path | None, typer.Argument(help="The job spec (YAML).")] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run the controller in the background; print the job id.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: JSON = False,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Pick up a job whose controller died; attach to (wait for) a live one."),
    ] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="Store URL (file://, s3://, gs://, az://); overrides the spec.")
    ] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="Override resources.gpu, e.g. A100:2.")] = None,
    provider: Annotated[
        list[str] | None, typer.Option("--provider", "-p", help="Override resources.providers (repeatable).")
    ] = None,
    region: Annotated[
        list[str] | None, typer.Option("--region", "-r", help="Override resources.regions (repeatable globs).")
    ] = None,
    spot: Annotated[bool | None, typer.Option("--spot/--on-demand", help="Override resources.spot.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Override the job's name.")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the workload (repeatable; never stored).")
    ] = None,
    env_file: Annotated[
        list[Path] | None, typer.Option("--env-file", help="A file of KEY=VALUE lines for the workload (repeatable).")
    ] = None,
) -> None:
    """Plan, provision, run and watch a job; relaunch on preemption; resume from the last checkpoint."""
    from spotrun.clouds.store import StoreError
    from spotrun.control.controller import Controller, ControllerBusy

    state = open_state()
    stop = Stop()
    recorded: list[str] = []  # the job this command drives, once known
    try:
        if resume:
            job_id = find_job_or_exit(state, resume, json_out).id
            recorded.append(job_id)
            if controller_alive(state.job(job_id)):
                _attach(state, job_id, json_out)
            if state.job(job_id).status.terminal:
                _report_finished(state, job_id, json_out)
            _refuse_resume_without_secrets(state, job_id, json_out)
        else:
            if spec is None:
                raise fail("give a job spec, or --resume JOB", json_out=json_out)
            overrides = Overrides(
                gpu=gpu,
                providers=list(provider or []),
                regions=list(region or []),
                spot=spot,
                name=name,
                env=list(env or []),
                env_files=list(env_file or []),
                store=store,
            )
            job_spec = load_spec_or_exit(spec, json_out=json_out, overrides=overrides)
            controller = Controller(state, store_url=store or _config_store(job_spec, json_out))
            ask = not (yes or json_out or detach or not sys.stdin.isatty())
            _confirm_plan(controller, job_spec, ask=ask, json_out=json_out)
            stop.install()
            started = time.time()
            try:  # a signal here stops the upload; a job it already recorded is cancelled, never left behind
                job_id = controller.submit(job_spec, progress=None if json_out else _upload_progress())
                recorded.append(job_id)
            except KeyboardInterrupt:
                stop.ignore_all()
                _cancel_submitted(state, job_spec.name, started)
                raise typer.Exit(EXIT_CANCELLED) from None
            except StoreError as e:  # a read-only, full or unreachable store: nothing was recorded
                stop.restore()
                raise fail(str(e), EXIT_BAD_INPUT, json_out=json_out) from None
            except BaseException:
                stop.restore()
                raise
            if detach:
                try:
                    from spotrun.cli.remote import hand_to_controller_host

                    if hand_to_controller_host(state, job_id, json_out) is None:  # controller: local
                        _spawn_detached_controller(job_id)
                except KeyboardInterrupt:
                    stop.ignore_all()
                    _cancel_after_interrupt(state, job_id)
                    raise typer.Exit(EXIT_CANCELLED) from None
                stop.restore()
                if json_out:
                    print_json({"job_id": job_id, "detached": True})
                else:
                    say(f"job [bold]{escape(job_id)}[/] launched in the background")
                    say_plain(f"  spotrun wait {job_id}    spotrun logs {job_id} -f    spotrun cancel {job_id}")
                return
        try:
            if not stop._old:
                stop.install()
            result = _run_foreground(state, job_id, stop, live=not json_out)
        except KeyboardInterrupt:  # a signal in the moment between recording the job and driving it
            stop.ignore_all()
            result = _cancel_after_interrupt(state, job_id)
        except ControllerBusy as e:
            raise fail(str(e), json_out=json_out) from None
        finally:
            stop.restore()
        if json_out:
            print_json(result.to_dict())
        raise typer.Exit(result.exit_code)
    except KeyboardInterrupt:
        # A signal in a gap between the handlers above (the job recorded, not yet driven): still
        # never leave it without a controller. A job driven by a live controller is left to it.
        stop.ignore_all()
        job = state.job(recorded[-1]) if recorded else None
        if job is not None and not job.status.terminal and not controller_alive(job):
            _cancel_after_interrupt(state, job.id)
        raise typer.Exit(EXIT_CANCELLED) from None


def _cancel_submitted(state: State, name: str, since: float) -> None:
    """Interrupted inside `submit`: cancel the job it may have recorded just before (nothing was
    launched for it yet, so this only marks it CANCELLED)."""
    from spotrun.control.controller import Controller

    for job in state.jobs(20):
        if job.name == name and job.created_at >= since and not job.status.terminal and not job.controller_pid:
            state.request_cancel(job.id, time.time())
            Controller(state).run(job.id)


def _config_store(spec: JobSpec, json_out: bool) -> str | None:
    """The config file's store, when neither the spec nor --store names one."""
    if spec.store is not None:
        return None
    from spotrun.cli.defaults import ConfigError, load_config

    try:
        return load_config().get("store")
    except ConfigError as e:
        raise fail(str(e), json_out=json_out) from None


def _confirm_plan(controller: Any, job_spec: JobSpec, *, ask: bool, json_out: bool) -> None:
    """Plan; exit 3 when nothing fits, 4 when only the budget or deadline rules every offer out
    (a guess is not grounds to refuse: without a runtime the limits are enforced as it runs)."""
    from spotrun.control.planning import runtime_known
    from spotrun.planner import plan

    result = plan(job_spec, controller.offers_for(job_spec))
    candidates = list(result.candidates)
    unknown_runtime = not runtime_known(job_spec)
    if not candidates and result.near_misses:
        if not unknown_runtime:
            raise fail(
                f"no offer meets the budget and deadline: {result.explain_empty()}", EXIT_BUDGET, json_out=json_out
            )
        candidates = list(result.near_misses)
    if not candidates:
        raise fail(f"no offer fits this job: {result.explain_empty()}", EXIT_NO_CAPACITY, json_out=json_out)
    best = candidates[0]
    if not json_out:
        o = best.offer
        cost = (
            "expected cost unknown (the spec gives no runtime: set workload.hours)"
            if unknown_runtime
            else f"expected ${best.expected_cost:.2f} over {best.expected_hours:.2f} h"
        )
        say_plain(
            f"plan: {o.provider}/{o.location} {o.instance_type} ({f'{o.gpu_count}× {o.gpu}' if o.gpu else 'no GPU'}) "
            f"{'spot' if best.spot else 'on-demand'} ${best.hourly_price:.4f}/h, {cost} "
            f"({len(candidates)} candidates)"
        )
    if ask and not typer.confirm("launch?", default=True):
        say_plain("not launched", stderr=True)
        raise typer.Exit(EXIT_CANCELLED)


def _upload_progress() -> Any:
    def start(label: str, total: int) -> Any:
        if total < 8 * 1024 * 1024 or not console().is_terminal:  # only for uploads that take more than a moment
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console(),
        )
        progress.start()
        task = progress.add_task(f"uploading {escape(label)}", total=total)
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


class _Printer:
    """Prints new events and the workload's output (never as markup) during a foreground launch."""

    def __init__(self, state: State, job_id: str) -> None:
        self.state = state
        self.job_id = job_id
        self.seen = 0
        self.reader: Any = None
        self.last_log = 0.0
        self.broken = False

    def events(self) -> None:
        for e in self.state.events(self.job_id, after_id=self.seen):
            self.seen = e.id
            stamp = time.strftime("%H:%M:%S", time.localtime(e.at))
            console().print(plain(f"{stamp} {e.message}"), soft_wrap=True)

    def logs(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_log < 1.0:
            return
        self.last_log = time.monotonic()
        from spotrun.cli.jobs import print_log_chunks
        from spotrun.clouds.store import StoreError

        try:
            if self.reader is None:
                from spotrun.cli.logs import LogReader

                self.reader = LogReader(self.state, self.job_id)
            print_log_chunks(self.reader.poll())
        except (StoreError, OSError):  # the output is shown again by `spotrun logs`; never stop the job for it
            pass

    def update(self, _snap: Any = None) -> None:
        """Called from inside the controller's loop: a printing failure (a closed pipe) must never
        stop the job, so it only stops the printing."""
        if self.broken:
            return
        try:
            self.events()
            self.logs()
        except (OSError, ValueError, SystemExit):  # rich turns a closed pipe into SystemExit(1)
            self.broken = True


def _run_foreground(state: State, job_id: str, stop: Stop, *, live: bool) -> Any:
    from spotrun.cli import views
    from spotrun.control.controller import Controller

    controller = Controller(state)
    printer = _Printer(state, job_id)
    try:
        stop.release()
        if not live:
            return Controller(state).run(job_id)
        if console().is_terminal:
            from rich.live import Live

            with Live(console=console(), refresh_per_second=4, transient=False) as view:

                def update(snap: Any) -> None:
                    printer.update()
                    if not printer.broken:
                        view.update(views.live_panel(snap))

                controller.on_update = update
                result = controller.run(job_id)
        else:
            controller.on_update = printer.update
            result = controller.run(job_id)
    except KeyboardInterrupt:
        stop.ignore_all()
        result = _cancel_after_interrupt(state, job_id, quiet=not live)
    except (Exception, SystemExit):
        # A foreground job has no other controller: whatever stopped this one, release the job's
        # instances before the error is shown (it can be resumed or inspected afterwards).
        stop.ignore_all()
        try:
            _cancel_after_interrupt(state, job_id, quiet=True)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise
    if live and not printer.broken:
        try:
            printer.events()
            printer.logs(force=True)
            console().print(views.result_summary(result, state.attempts(job_id)))
        except (OSError, ValueError, SystemExit):  # a closed pipe: the job's exit code still counts
            pass
    return result


def _cancel_after_interrupt(state: State, job_id: str, *, quiet: bool = False) -> Any:
    """Ctrl-C, SIGTERM or SIGHUP on a foreground launch: the job has no controller left, so cancel
    it and release its instances now rather than leave them billing."""
    from spotrun.control.controller import Controller, ControllerBusy

    say_plain(
        "interrupted: cancelling the job and releasing its instances (use --detach to keep jobs running)", stderr=True
    )
    state.request_cancel(job_id, time.time())
    state.release_controller(job_id, os.getpid())
    try:
        return Controller(state).run(job_id)
    except ControllerBusy:  # a detached controller holds it: it acts on the cancel request itself
        from spotrun.cli.jobs import wait_for_end

        wait_for_end(state, job_id)
        return Controller(state).result(job_id)


def _attach(state: State, job_id: str, json_out: bool) -> None:
    """`launch --resume` on a job a live controller drives: follow it until it ends; exit with its code.
    Ctrl-C only detaches (the job keeps its controller)."""
    if not json_out:
        say_plain(f"job {job_id} already has a live controller: following it (Ctrl-C detaches)")
    printer = _Printer(state, job_id)
    try:
        final = wait_for_end(
            state, job_id, json_out=json_out, on_poll=None if json_out else lambda _j: printer.update()
        )
    except KeyboardInterrupt:
        say_plain(f"detached; the job keeps running: spotrun wait {job_id}", stderr=True)
        raise typer.Exit(EXIT_CANCELLED) from None
    _report_finished(state, final.id, json_out)


def _report_finished(state: State, job_id: str, json_out: bool) -> None:
    from spotrun.control.controller import Controller

    result = Controller(state).result(job_id)
    if json_out:
        print_json(result.to_dict())
    else:
        from spotrun.cli import views

        console().print(views.result_summary(result, state.attempts(job_id)))
    raise typer.Exit(exit_code_of(state.job(job_id)))


__all__ = ["EXIT_BAD_INPUT", "launch"]


def _refuse_resume_without_secrets(state: Any, job_id: str, json_out: bool) -> None:
    """A `${VAR}` this shell lacks: exit 2 unless the clouds already hold the job's secret."""
    from spotrun.control.secrets import resume_refusal

    refusal = resume_refusal(state, job_id)
    if refusal:
        raise fail(refusal, json_out=json_out)
