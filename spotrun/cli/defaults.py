"""The user's defaults: `~/.config/spotrun/config.yaml` (platformdirs' user_config_dir;
`SPOTRUN_CONFIG` names another file).

    store: s3://my-bucket/spotrun     # used when a spec gives no `store:`
    providers: [aws, gcp]             # used when a spec gives no resources.providers
    regions: ["us-*"]                 # used when a spec gives no resources.regions
    budget: 50                        # USD, used when a spec gives no budget
    controller: cloud                 # detached jobs' controllers on a small on-demand host (default local)

A spec's own value always wins; CLI flags (`--provider`, `--region`, `--store`) win over both.
Unknown keys and bad values are refused with the file and key named (exit 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

KEYS: dict[str, str] = {
    "store": "store URL used when the spec gives none (file://, s3://, gs://, az://)",
    "providers": "providers used when the spec gives none (list: aws, gcp, azure, local)",
    "regions": "region globs used when the spec gives none (list)",
    "budget": "budget in USD used when the spec gives none",
    "controller": "where detached jobs' controllers run: local (this machine) or cloud (a small on-demand host)",
}
LIST_KEYS = ("providers", "regions")


class ConfigError(Exception):
    """The config file or a value given to `spotrun config set` is unusable."""


def config_path() -> Path:
    env = os.environ.get("SPOTRUN_CONFIG")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("spotrun", appauthor=False)) / "config.yaml"


def load_config(path: Path | None = None) -> dict[str, Any]:
    """The config's values (empty when there is no file). Raises ConfigError naming the problem."""
    import yaml

    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys ({', '.join(KEYS)})")
    return {key: check_value(key, value, where=str(path)) for key, value in data.items()}


def check_value(key: Any, value: Any, *, where: str = "config") -> Any:
    from spotrun.spec import PROVIDERS

    if key not in KEYS:
        raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(KEYS)}")
    if key in LIST_KEYS:
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(x, str) and x.strip() for x in items):
            raise ConfigError(f"{where}: {key}: expected a list of names, got {value!r}")
        if key == "providers":
            bad = [x for x in items if x not in PROVIDERS]
            if bad:
                raise ConfigError(f"{where}: providers: unknown {bad[0]!r}; allowed: {', '.join(PROVIDERS)}")
        return list(items)
    if key == "budget":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: budget: expected a number of USD, got {value!r}") from None
        if not (number > 0 and number < float("inf")):
            raise ConfigError(f"{where}: budget: expected a positive finite number, got {value!r}")
        return number
    if key == "controller":
        if value not in ("local", "cloud"):
            raise ConfigError(f"{where}: controller: expected local or cloud, got {value!r}")
        return value
    if not isinstance(value, str) or "://" not in value:
        raise ConfigError(f"{where}: store: expected a URL like s3://bucket/prefix or file:///path, got {value!r}")
    return value


def parse_cli_value(key: str, text: str) -> Any:
    """A value typed after `spotrun config set KEY`: lists comma-separated."""
    if key in LIST_KEYS:
        return check_value(key, [x.strip() for x in text.split(",") if x.strip()])
    return check_value(key, text)


def save_config(data: dict[str, Any], path: Path | None = None) -> Path:
    import yaml

    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def apply_defaults(raw: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A spec's raw data with the config's defaults filled in where the spec gives none."""
    out = dict(raw)
    resources = dict(out.get("resources") or {})
    for key in LIST_KEYS:
        if key in config and not resources.get(key):
            resources[key] = list(config[key])
    if resources:
        out["resources"] = resources
    if "store" in config and not out.get("store"):
        out["store"] = config["store"]
    if "budget" in config and out.get("budget") is None:
        out["budget"] = config["budget"]
    return out
