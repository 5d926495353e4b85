"""The `spotrun` command line. It parses, calls and renders; the work is done elsewhere.

The commands live beside this file: launch.py (launch), jobs.py (status, wait, logs, cancel),
cleanup.py (rm, gc), cost.py (cost), market.py (offers, plan, catalog), simulate.py, config.py;
output.py is how they all print (widths, JSON, the error shape, no markup from untrusted text).

Start-up must stay cheap: nothing here imports torch, a cloud SDK, pydantic or rich at module
level, and help is rendered by click's plain formatter (it never cuts flag names when piped).
A test checks `sys.modules` after `spotrun --help` and `spotrun status`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from spotrun import __version__
from spotrun.cli import cleanup as cli_cleanup
from spotrun.cli import config as cli_config
from spotrun.cli import cost as cli_cost
from spotrun.cli import jobs as cli_jobs
from spotrun.cli import launch as cli_launch
from spotrun.cli import market as cli_market
from spotrun.cli import simulate as cli_simulate
from spotrun.cli.output import EXIT_BAD_INPUT, console, fail, print_json, say_plain
from spotrun.cli.params import install as _light_params

_light_params()  # plain str/int/float/Path options without pydantic (start-up; see params.py)

app = typer.Typer(
    name="spotrun",
    help="Run ML training on the cheapest spot GPU that fits, across AWS, GCP and Azure, through preemptions.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    # Piped help is laid out wide, so no command's summary or flag is cut; a terminal keeps its width.
    context_settings={"max_content_width": 200, "terminal_width": None if sys.stdout.isatty() else 200},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spotrun {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """spotrun: plan, launch and babysit training jobs on spot GPUs."""


# ---------------------------------------------------------------------------- validate


@app.command()
def validate(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    json_out: cli_jobs.JSON = False,
) -> None:
    """Check a job spec and report every problem (file, line, key, what is allowed). Exit 2 if invalid."""
    from spotrun.cli.specs import load_spec_or_exit

    job = load_spec_or_exit(spec, json_out=json_out)
    gpu = job.resources.gpu
    want = f"{gpu.count}× {gpu.name or 'any GPU'}" if gpu else "no GPU"
    if json_out:
        print_json({"ok": True, "file": str(spec), "name": job.name, "gpu": want, "labels": job.labels})
        return
    say_plain(f"ok {spec}: job {job.name}, {want}")


# ---------------------------------------------------------------------------- check


@app.command()
def check(
    spec: Annotated[
        Path | None,
        typer.Argument(help="A job spec: check its providers as it configures them (identity, network, store)."),
    ] = None,
    provider: Annotated[list[str] | None, typer.Option("--provider", "-p", help="Only these providers.")] = None,
    json_out: cli_jobs.JSON = False,
) -> None:
    """Which providers are configured and usable (credentials, region, quota hints, the VMs' identity).
    Launches nothing. Prints what each provider is missing; exits 2 when a provider asked for with -p
    is unknown or misses anything."""
    from spotrun.clouds import PROVIDERS, get_provider
    from spotrun.clouds.base import ProviderError

    known = list(PROVIDERS)
    unknown = [p for p in provider or [] if p not in known]
    if unknown:
        raise fail(f"unknown provider {unknown[0]!r}; known: {', '.join(known)}", json_out=json_out)
    job = None
    if spec is not None:
        from spotrun.cli.specs import load_spec_or_exit

        job = load_spec_or_exit(spec, json_out=json_out)
    rows = []
    for name in provider or known:
        try:
            rows.append(get_provider(name, **_check_options(name, job)).check())
        except (ProviderError, ImportError, ValueError, TypeError, OSError) as e:
            rows.append({"provider": name, "usable": False, "detail": str(e), "missing": [str(e)]})
    for r in rows:  # one contract: anything missing makes the provider unusable
        r["missing"] = [str(m) for m in r.get("missing") or []]
        r["usable"] = bool(r["usable"]) and not r["missing"]
    bad = bool(provider) and not all(r["usable"] for r in rows)
    if json_out:
        print_json({"providers": rows, "ok": not bad})
    else:
        from rich.table import Table
        from rich.text import Text

        table = Table(title="providers")
        table.add_column("PROVIDER", no_wrap=True)
        table.add_column("USABLE", no_wrap=True)
        table.add_column("DETAIL")
        for r in rows:
            table.add_row(
                Text(r["provider"]),
                Text("yes", style="green") if r["usable"] else Text("no", style="red"),
                Text(str(r.get("detail", ""))),
            )
        console().print(table)
        for r in rows:
            for item in r["missing"] if r["missing"] != [r.get("detail")] else []:
                say_plain(f"{r['provider']}: missing {item}")
    if bad:
        raise typer.Exit(EXIT_BAD_INPUT)


def _check_options(name: str, job: object) -> dict[str, object]:
    """A provider's options from the job spec (its section, disk, max price); none without a spec."""
    if job is None:
        return {}
    from spotrun.control.specs import provider_options

    return provider_options(name, job)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- registration

app.command()(cli_launch.launch)
app.command()(cli_jobs.status)
app.command()(cli_jobs.wait)
app.command()(cli_jobs.logs)
app.command()(cli_jobs.cancel)
app.command()(cli_cleanup.rm)
app.command()(cli_cleanup.gc)
app.command()(cli_cost.cost)
app.command()(cli_market.offers)
app.command("plan")(cli_market.plan)
app.add_typer(cli_market.catalog_app, name="catalog", help="The bundled offer catalog and its live refresh.")
app.add_typer(cli_config.config_app, name="config", help="Your defaults: ~/.config/spotrun/config.yaml.")
app.command("simulate")(cli_simulate.simulate)


def main() -> None:
    """Run the app. SIGTERM (CI cancel, `timeout`) and SIGHUP act like Ctrl-C (exit 130; a
    foreground launch cancels its job first); a usage error under --json comes out in the JSON
    error shape (exit 2)."""
    import signal

    raised = [False]

    def interrupted(signum: int, frame: object) -> None:
        if not raised[0]:  # once: a second signal must not interrupt the handling of the first
            raised[0] = True
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    try:
        code = _run()
    except KeyboardInterrupt:  # a signal outside a command's own handling
        code = 130
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # the work is done: a late signal must not become a traceback
    raise SystemExit(code)


def _run() -> int:
    from typer._click.exceptions import ClickException  # typer's own click (typer >= 0.29 vendors it)

    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        say_plain("aborted", stderr=True)
        return 130
    except ClickException as e:
        if "--json" in sys.argv[1:]:
            print_json({"error": {"code": e.exit_code, "message": e.format_message(), "issues": []}})
        else:
            e.show()
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
