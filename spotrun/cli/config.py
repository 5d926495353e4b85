"""`spotrun config`: show, get and set your defaults (store, providers, regions, budget) in
`~/.config/spotrun/config.yaml` (`SPOTRUN_CONFIG` names another file). See spotrun/cli/defaults.py."""

from __future__ import annotations

from typing import Annotated

import typer

from spotrun.cli.output import EXIT_BAD_INPUT, fail, print_json, say_plain

JSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]

config_app = typer.Typer(no_args_is_help=False, invoke_without_command=True)


@config_app.callback(invoke_without_command=True)
def _show_by_default(ctx: typer.Context, json_out: JSON = False) -> None:
    """Your defaults; `spotrun config` alone shows them."""
    if ctx.invoked_subcommand is None:
        show(json_out)


@config_app.command()
def show(json_out: JSON = False) -> None:
    """The config file's path and every value in it."""
    from spotrun.cli.defaults import ConfigError, config_path, load_config

    try:
        data = load_config()
    except ConfigError as e:
        raise fail(str(e), json_out=json_out) from None
    if json_out:
        print_json({"path": str(config_path()), "values": data})
        return
    say_plain(f"# {config_path()}" + ("" if data else " (no values set)"))
    for key, value in data.items():
        say_plain(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


@config_app.command()
def get(
    key: Annotated[str, typer.Argument(help="store, providers, regions or budget.")], json_out: JSON = False
) -> None:
    """One value (exit 1 when it is not set)."""
    from spotrun.cli.defaults import KEYS, ConfigError, load_config

    if key not in KEYS:
        raise fail(f"unknown key {key!r}; allowed: {', '.join(KEYS)}", json_out=json_out)
    try:
        data = load_config()
    except ConfigError as e:
        raise fail(str(e), json_out=json_out) from None
    if json_out:
        print_json({"key": key, "value": data.get(key)})
    elif key in data:
        value = data[key]
        say_plain(", ".join(value) if isinstance(value, list) else str(value))
    if key not in data:
        raise typer.Exit(1)


@config_app.command("set")
def set_(
    key: Annotated[str, typer.Argument(help="store, providers, regions or budget.")],
    value: Annotated[str | None, typer.Argument(help="The value (lists comma-separated); omit with --unset.")] = None,
    unset: Annotated[bool, typer.Option("--unset", help="Remove the key.")] = False,
    json_out: JSON = False,
) -> None:
    """Set (or --unset) one default."""
    from spotrun.cli.defaults import ConfigError, load_config, parse_cli_value, save_config

    try:
        data = load_config()
        if unset:
            data.pop(key, None)
        elif value is None:
            raise ConfigError(f"give a value for {key}, or --unset")
        else:
            data[key] = parse_cli_value(key, value)
        path = save_config(data)
    except ConfigError as e:
        raise fail(str(e), EXIT_BAD_INPUT, json_out=json_out) from None
    if json_out:
        print_json({"path": str(path), "values": data})
    else:
        say_plain(f"{path}: {key} {'removed' if unset else 'set'}")
