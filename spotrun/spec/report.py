"""Pydantic's validation errors turned into the user's problems: each with the line and column
of the key or value it is about, a message that says what is allowed, and for unknown keys the
closest valid one (or a known synonym from other tools' specs)."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)
from yaml.nodes import ScalarNode

from spotrun.spec.issues import SpecIssue, _did_you_mean, _join_path, _Problems, closest_match
from spotrun.spec.models import LOADER_FIELDS, JobSpec
from spotrun.spec.units import describe
from spotrun.spec.yamlpos import KeyPath, Reader


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The model class that validates the mapping at `path` (None when it is not a model)."""
    current: Any = JobSpec
    for part in path:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        current = _unwrap_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
        return None
    return annotation


def _user_keys(model: type[BaseModel]) -> list[str]:
    return [k for k in model.model_fields if not (model is JobSpec and k in LOADER_FIELDS)]


def _all_key_paths(model: type[BaseModel] = JobSpec, prefix: str = "") -> dict[str, list[str]]:
    """Every key name in the spec -> the dotted paths it lives at (to say where a misplaced key goes)."""
    found: dict[str, list[str]] = {}
    for key in _user_keys(model):
        found.setdefault(key, []).append(prefix + key)
        inner = _unwrap_model(model.model_fields[key].annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            for name, paths in _all_key_paths(inner, f"{prefix}{key}.").items():
                found.setdefault(name, []).extend(paths)
    return found


def _unknown_key_message(parent: KeyPath, key: str) -> str:
    model = _model_at(parent)
    allowed = sorted(_user_keys(model)) if model else []
    message = f"unknown key {key!r}"
    if allowed:
        message += f"; allowed: {', '.join(allowed)}"
    # A near-exact match here beats the same key elsewhere (`gpu` at the top means `resources.gpu`),
    # which beats what other tools call it, which beats a fuzzy match here.
    here = _join_path(parent) + "." if parent else ""
    elsewhere = [p for p in _all_key_paths().get(key, []) if p != here + key]
    suggestion = closest_match(key, allowed, cutoff=1.0) or (elsewhere[0] if elsewhere else None)
    synonym = _SYNONYMS.get(key.lower().replace("-", "_"))
    if not suggestion and synonym and synonym != here + key:
        suggestion = synonym[len(here) :] if synonym.startswith(here) else synonym
    suggestion = suggestion or closest_match(key, allowed)
    return message + (f" (did you mean {suggestion!r}?)" if suggestion else "")


# What other tools (docker-compose, SkyPilot, Kubernetes, CI files) call our keys.
_SYNONYMS: dict[str, str] = {
    "command": "run", "cmd": "run", "script": "run", "entrypoint": "run",
    "install": "setup", "docker": "image", "container": "image",
    "environment": "env", "envs": "env", "vars": "env",
    "code": "workdir", "working_dir": "workdir", "dir": "workdir",
    "bucket": "store", "storage": "store",
    "retries": "recovery.max_restarts", "max_retries": "recovery.max_restarts",
    "restarts": "recovery.max_restarts",
    "timeout": "deadline", "time_limit": "deadline", "max_duration": "deadline",
    "cost": "budget", "max_cost": "budget", "max_budget": "budget",
    "gpus": "resources.gpu", "accelerators": "resources.gpu", "accelerator": "resources.gpu",
    "cloud": "resources.providers", "clouds": "resources.providers", "provider": "resources.providers",
    "region": "resources.regions", "zone": "resources.zones",
    "use_spot": "resources.spot", "preemptible": "resources.spot",
    "ram": "resources.memory", "disk_size": "resources.disk", "cpu": "resources.cpus",
    "vcpus": "resources.cpus",
}  # fmt: skip

_MISSING_HINT = {
    ("name",): " (a short job name like 'my-job')",
    ("run",): " (the command that starts training, like 'python train.py')",
}


def _error_message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    got = describe(error.get("input"))
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {got}"
    if kind in ("list_type", "set_type", "tuple_type"):
        return f"expected a list, got {got}"
    if kind.startswith("string_"):
        return f"expected text, got {got}"
    if kind.startswith("bool_"):
        return f"expected true or false, got {got}"
    if kind.startswith("int_"):
        return f"expected a whole number, got {got}"
    if kind.startswith("float_"):
        return f"expected a number, got {got}"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        hint = _did_you_mean(str(error.get("input")), allowed)
        return f"{got} is not allowed; allowed: {', '.join(allowed)}{hint}"
    if kind in ("value_error", "assertion_error"):
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {got}"


def _issues_from(exc: ValidationError, reader: Reader | None, file: str) -> list[tuple[KeyPath, SpecIssue]]:
    """One SpecIssue per problem in a pydantic ValidationError, positioned with the reader's map."""
    found: list[tuple[KeyPath, SpecIssue]] = []

    def add(path: KeyPath, message: str, *, at_key: bool = False, missing: bool = False) -> None:
        # A problem below a value the file gives as one scalar (`gpu: A1OO:2` checked as a GpuRequest's
        # name) belongs to the key the user actually wrote.
        if reader is not None:
            for end in range(len(path) - 1, 0, -1):
                where = reader.where.get(path[:end])
                if where is not None:
                    if isinstance(where.node, ScalarNode):
                        path, at_key, missing = path[:end], False, False
                    break
        line, column = _position(reader, path, at_key=at_key, missing=missing)
        found.append((path, SpecIssue(file, line, column, _join_path(path), message)))

    for error in exc.errors(include_url=False):
        loc: KeyPath = tuple(part for part in error["loc"] if part != "[key]")
        at_key = "[key]" in error["loc"]
        problems = error.get("ctx", {}).get("error")
        if error["type"] == "value_error" and isinstance(problems, _Problems):
            for rel, message, rel_at_key in problems.items:
                add((*loc, *rel), message, at_key=rel_at_key)
        elif error["type"] == "missing":
            add(loc, "required key is missing" + _MISSING_HINT.get(loc, ""), missing=True)
        elif error["type"] == "extra_forbidden":
            add(loc, _unknown_key_message(loc[:-1], str(loc[-1])), at_key=True)
        else:
            add(loc, _error_message(error), at_key=at_key)
    return found


def _position(
    reader: Reader | None, path: KeyPath, *, at_key: bool = False, missing: bool = False
) -> tuple[int | None, int | None]:
    """Line and column for a key path: its key or value, or for a missing key the enclosing mapping
    (the nearest ancestor the file has)."""
    if reader is None:
        return None, None
    if missing:
        path = path[:-1]
    for end in range(len(path), -1, -1):
        where = reader.where.get(path[:end])
        if where is not None:
            return where.key if at_key and end == len(path) and where.key else where.value
    return 1, 1
