"""Reading a spec for a command: the file, then the user's config defaults, then CLI overrides
(`--gpu`, `--provider`, `--region`, `--spot/--on-demand`, `--name`, `--env`, `--env-file`).

Overrides are applied to the validated spec's data and validated again, so a bad override is
refused with the flag named, exactly as a bad key in the file would be (exit 2). Values given with
`--env`/`--env-file` are treated as secrets: they reach the workload through the controller's
environment and are stored only as `${KEY}` references, never as values.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from spotrun.cli.output import EXIT_BAD_INPUT, fail, spec_issues

if TYPE_CHECKING:
    from spotrun.spec import JobSpec

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Overrides:
    gpu: str | None = None
    providers: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    spot: bool | None = None
    name: str | None = None
    env: list[str] = field(default_factory=list)  # KEY=VALUE
    env_files: list[Path] = field(default_factory=list)
    store: str | None = None

    def any(self) -> bool:
        return bool(
            self.gpu or self.providers or self.regions or self.spot is not None or self.name or self.env
        ) or bool(self.env_files)


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (dotenv style): '#' comments, blank lines, optional 'export ' and quotes."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--env-file {path}: cannot read it: {e}") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _ENV_NAME.fullmatch(key):
            raise ValueError(f"{path}:{n}: expected KEY=VALUE, got {line[:60]!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def _env_pairs(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:  # `--env KEY` passes the launching shell's value on, as docker does
            if key not in os.environ:
                raise ValueError(f"--env {key}: no '=' and no such variable in the environment")
            value = os.environ[key]
        if not _ENV_NAME.fullmatch(key):
            raise ValueError(f"--env {item!r}: expected KEY=VALUE with KEY of letters, digits and '_'")
        out[key] = value
    return out


def load_spec_or_exit(path: Path, *, json_out: bool = False, overrides: Overrides | None = None) -> JobSpec:
    """The spec with config defaults and overrides applied, or exit 2 with every problem."""
    from spotrun.cli.defaults import ConfigError, load_config
    from spotrun.spec import SpecError, load_spec

    try:
        spec = load_spec(path)
    except SpecError as e:
        if json_out:
            raise fail(
                f"{path}: {len(e.issues)} problem(s) in the spec", json_out=True, issues=spec_issues(e)
            ) from None
        from spotrun.cli.output import say_plain

        say_plain(str(e), stderr=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        config = load_config()
    except ConfigError as e:
        raise fail(str(e), json_out=json_out) from None
    changes = _changes(spec, config, overrides or Overrides())
    if not changes:
        return spec
    try:
        return _rebuilt(spec, changes)
    except SpecError as e:
        issues = spec_issues(e)
        raise fail(
            "the command-line overrides or config defaults make the spec invalid: "
            + "; ".join(f"{i['key']}: {i['message']}" for i in issues),
            json_out=json_out,
            issues=issues,
        ) from None
    except ValueError as e:
        raise fail(str(e), json_out=json_out) from None


def _changes(spec: JobSpec, config: dict[str, Any], o: Overrides) -> dict[str, Any]:
    res: dict[str, Any] = {}
    top: dict[str, Any] = {}
    if spec.resources.providers is None and "providers" in config:
        res["providers"] = config["providers"]
    if spec.resources.regions is None and "regions" in config:
        res["regions"] = config["regions"]
    if spec.store is None and "store" in config and o.store is None:
        top["store"] = config["store"]
    if spec.budget is None and "budget" in config:
        top["budget"] = config["budget"]
    if o.gpu:
        res["gpu"] = o.gpu
    if o.providers:
        res["providers"] = o.providers
    if o.regions:
        res["regions"] = o.regions
        if spec.resources.zones:  # zones outside the new regions would be refused: the override wins
            res["zones"] = None
    if o.spot is not None:
        res["spot"] = o.spot
    if o.name:
        top["name"] = o.name
    env: dict[str, str] = {}
    for path in o.env_files:
        env.update(parse_env_file(path))
    env.update(_env_pairs(o.env))
    if env:
        top["env"] = env
    if res:
        top["resources"] = res
    return top


def _rebuilt(spec: JobSpec, changes: dict[str, Any]) -> JobSpec:
    from spotrun.spec import JobSpec

    data = spec.persistable()
    for key, value in changes.items():
        if key == "resources":
            data["resources"] = {**data["resources"], **value}
        elif key == "env":
            for name, text in value.items():
                os.environ[name] = text  # the controller (and a detached one, its child) reads it from here
                data["env"][name] = "${" + name + "}"
            data["secret_env_keys"] = sorted(set(data.get("secret_env_keys") or ()) | set(value))
        else:
            data[key] = value
    return JobSpec.from_persisted(data)
