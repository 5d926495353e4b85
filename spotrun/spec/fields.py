"""Field parsers shared by the spec's models: text, words, whole numbers, flags, positive
quantities with units, lists, local paths, choices from a fixed set, GPU names."""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationInfo,
)

import spotrun.spec.units as units
from spotrun.spec.issues import _did_you_mean, _Problems
from spotrun.spec.units import describe
from spotrun.spec.yamlpos import KeyPath


def _base_dir(info: ValidationInfo) -> Path:
    """The folder relative paths in the spec are resolved against: the spec file's folder."""
    context = info.context if isinstance(info.context, Mapping) else {}
    base = context.get("base_dir") or info.data.get("base_dir") or Path.cwd()
    return Path(base)


def _environ(info: ValidationInfo) -> Mapping[str, str]:
    context = info.context if isinstance(info.context, Mapping) else {}
    environ = context.get("environ")
    return environ if environ is not None else os.environ


def _text(value: object) -> str:
    """A text field: strings as they are; whole numbers accepted (`project: 123456`); anything else
    refused rather than silently stringified (`3.10` would become '3.1', `yes` would become 'True')."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) or isinstance(value, bool):
        raise ValueError(f"expected text, got {describe(value)}; put it in quotes to keep it as text")
    raise ValueError(f"expected text, got {describe(value)}")


def _word(value: object) -> str:
    """Non-empty text without spaces (names, ids, image references)."""
    text = _text(value).strip()
    if not text:
        raise ValueError("must not be empty")
    if re.search(r"\s", text):
        raise ValueError(f"must not contain spaces, got {describe(text)}")
    return text


MAX_WHOLE = 10**9  # no count in a job spec is larger; a 400-digit one would overflow every float after it


def _whole(low: int, high: int | None = None) -> typing.Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,30}\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {describe(value)}")
        if value > MAX_WHOLE and (high is None or high > MAX_WHOLE):
            raise ValueError(f"must be at most {MAX_WHOLE}, got {describe(value)[:40]}")
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise ValueError(f"must be {allowed}, got {value}")
        return value

    return check


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"expected true or false, got {describe(value)}")


def _positive(parse: typing.Callable[[object], float]) -> typing.Callable[[object], float]:
    def check(value: object) -> float:
        number = parse(value)
        if number <= 0:
            raise ValueError(f"must be greater than 0, got {describe(value)}")
        return number

    return check


def _str_list(value: object, what: str) -> list[str]:
    """A list of words; a single string is taken as a list of one (`providers: aws`)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a list of {what}, got {describe(value)}")
    if not value:
        raise ValueError(f"must not be empty; leave the key out to allow all {what}")
    items: list[str] = []
    problems: list[tuple[KeyPath, str, bool]] = []
    for i, item in enumerate(value):
        try:
            word = _word(item)
        except ValueError as exc:
            problems.append(((i,), str(exc), False))
            continue
        if word not in items:
            items.append(word)
    if problems:
        raise _Problems(problems)
    return items


def _local_path(value: object, info: ValidationInfo, *, want_dir: bool | None, what: str) -> Path:
    """An existing local path, relative to the spec's folder; want_dir None accepts file or folder."""
    text = _text(value).strip()
    if not text:
        raise ValueError("must not be empty")
    base = _base_dir(info)
    given = Path(text).expanduser()
    path = (given if given.is_absolute() else base / given).resolve()
    context = info.context if isinstance(info.context, Mapping) else {}
    if not context.get("check_paths", True):
        return path
    if not path.exists():
        relative = "" if given.is_absolute() else f" (relative to the spec's folder {base})"
        raise ValueError(f"{what} {str(path)!r} does not exist{relative}")
    if want_dir is True and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file, expected a folder")
    if want_dir is False and path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, expected a file")
    return path


Word = Annotated[str, BeforeValidator(_word)]
Flag = Annotated[bool, BeforeValidator(_flag)]


def _unit_required(parse: typing.Callable[[object], float], what: str, unit: str, example: str):  # noqa: ANN202
    """A size or a duration in a spec file must say its unit: `deadline: 12` is refused ("did you
    mean 12h?") rather than read as 12 seconds. A saved spec (State) holds plain numbers in the
    fixed units: `from_persisted` sets `units_implied` in the context."""

    def check(value: object, info: ValidationInfo) -> float:
        context = info.context if isinstance(info.context, Mapping) else {}
        if not context.get("units_implied") and units.has_no_unit(value):
            shown = str(value).strip()
            number = float(shown) if units.has_no_unit(shown) else 0.0
            suggest = f"{shown}{'s' if unit in ('h', 'm') and number >= 100 else unit}"
            raise ValueError(f"{what} {describe(value)} has no unit: did you mean {suggest}? (e.g. {example})")
        return parse(value)

    return check


SizeGB = Annotated[float, BeforeValidator(_unit_required(_positive(units.parse_size_gb), "size", "GB", "40GB, 512MB"))]
Seconds = Annotated[
    float, BeforeValidator(_unit_required(_positive(units.parse_duration_s), "duration", "h", "12h, 30m, 90s"))
]
PlainGB = Annotated[float, BeforeValidator(_positive(units.parse_size_gb))]  # a field named *_gb: GB implied
USD = Annotated[float, BeforeValidator(_positive(units.parse_money))]
USDPerHour = Annotated[float, BeforeValidator(_positive(units.parse_hourly_price))]
Hours = Annotated[float, BeforeValidator(_positive(units.parse_hours))]
ParamCount = Annotated[float, BeforeValidator(_positive(units.parse_param_count))]

PROVIDERS: tuple[str, ...] = ("local", "aws", "gcp", "azure")
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "int8")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "sgd", "adafactor", "lion")
STORE_SCHEMES: tuple[str, ...] = ("file", "s3", "gs", "az")
DATA_SCHEMES: tuple[str, ...] = ("s3", "gs", "az", "file")


def _choice(allowed: tuple[str, ...], what: str) -> typing.Callable[[object], str]:
    """A case-insensitive choice among `allowed`, with a suggestion when it is none of them."""

    def check(value: object) -> str:
        text = _text(value).strip().lower()
        if text in allowed:
            return text
        raise ValueError(
            f"unknown {what} {describe(value)}; allowed: {', '.join(allowed)}{_did_you_mean(text, allowed)}"
        )

    return check


def _gpu_name(value: object) -> str:
    from spotrun.gpus import GPU_NAMES, canonical_gpu_name

    text = _text(value).strip()
    name = canonical_gpu_name(text)
    if name is None:
        raise ValueError(
            f"unknown GPU {describe(text)}; allowed: {', '.join(sorted(GPU_NAMES))}{_did_you_mean(text, GPU_NAMES)}"
        )
    return name


_MEMORY_SLACK = 1.075  # GiB vs GB: 2**30 / 10**9


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=False, defer_build=True)
