"""The job spec: one YAML file describing a training job, parsed into typed pydantic models.

    spec = load_spec("job.yaml")        # -> JobSpec, or raises SpecError

Nothing is launched from a spec that did not validate, so the errors are the user interface:
each one names the file, line and column, the dotted key path, what was given and what is allowed,
every problem in the file is reported at once, and a mistyped key suggests the closest valid one.
`str(SpecError)` renders one line per problem, e.g.

    job.yaml:12:5: resources.gpu: unknown GPU 'A1OO'; allowed: A10, A100, ... (did you mean 'A100'?)

How positions are kept: PyYAML composes the document into nodes that carry their marks; `Reader`
turns the node tree into plain Python values and, on the side, a map from each key path to where its
key and value start. Pydantic errors come back with a `loc` (the same key path), which the map turns
into a line and column. Validators that find several problems, or a problem below their own field
(a bad item in a list, a bad key in a mapping), raise `_Problems` carrying paths relative to the field.

Top-level keys starting with `x-` are ignored, so a spec can hold YAML anchors to reuse
(`x-common-env: &common {...}` then `env: {<<: *common, ...}`), as docker-compose files do.

Whatever the input (binary junk, tabs, duplicate keys, a list at the top level, a missing file),
`load_spec` raises `SpecError` and nothing else.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yaml.nodes import ScalarNode

from spotrun import units
from spotrun.units import describe
from spotrun.yamlpos import MAX_NODES, KeyPath, Reader, TooBig, node_mark, yaml_problem

__all__ = [
    "AWSOptions",
    "AzureOptions",
    "CheckpointSpec",
    "GCPOptions",
    "GpuRequest",
    "JobSpec",
    "LocalOptions",
    "RecoverySpec",
    "Resources",
    "SpecError",
    "SpecIssue",
    "WorkloadHint",
    "closest_match",
    "load_spec",
    "parse_spec_text",
]

MAX_SPEC_BYTES = 1 << 20  # a job spec is a few hundred bytes; anything this big is not one


# ============================================================================= errors


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec. `line`/`column` are 1-based; None when the file could not be read."""

    file: str
    line: int | None
    column: int | None
    key_path: str  # dotted, e.g. "resources.gpu" or "resources.providers[1]"; "" for the whole file
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.key_path}: {self.message}" if self.key_path else f"{where}: {self.message}"


class SpecError(Exception):
    """A spec that cannot be used; `issues` lists every problem found, in file order."""

    def __init__(self, issues: Iterable[SpecIssue]) -> None:
        unique = dict.fromkeys(issues)
        self.issues: list[SpecIssue] = sorted(unique, key=lambda i: (i.line or 0, i.column or 0, i.key_path, i.message))
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


class _Problems(ValueError):
    """Raised by validators: problems at paths relative to the validated field or model.

    Each item is (relative path, message, at_key); at_key points the position at the mapping key
    rather than at its value (for a bad env var name, say).
    """

    def __init__(self, items: list[tuple[KeyPath, str, bool]]) -> None:
        self.items = items
        super().__init__("; ".join(_join_path(path) + ": " + msg if path else msg for path, msg, _ in items))


def _problem(path: KeyPath, message: str, *, at_key: bool = False) -> _Problems:
    return _Problems([(path, message, at_key)])


def closest_match(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice closest to `word`: same letters in another case, look-alike digits ('A1OO' for
    'A100'), or difflib's best match above `cutoff`; None if nothing is close."""
    by_lower = {choice.lower(): choice for choice in choices}
    low = word.strip().lower()
    if low in by_lower:
        return by_lower[low]
    lookalike = str.maketrans({"o": "0", "l": "1", "i": "1"})
    by_lookalike = {c.translate(lookalike): choice for c, choice in by_lower.items()}
    if low.translate(lookalike) in by_lookalike:
        return by_lookalike[low.translate(lookalike)]
    match = difflib.get_close_matches(low, list(by_lower), n=1, cutoff=cutoff)
    return by_lower[match[0]] if match else None


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    best = closest_match(word, choices)
    return f" (did you mean {best!r}?)" if best and best != word else ""


def _join_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


# ============================================================================= field helpers


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


def _whole(low: int, high: int | None = None) -> typing.Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {describe(value)}")
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
SizeGB = Annotated[float, BeforeValidator(_positive(units.parse_size_gb))]
Seconds = Annotated[float, BeforeValidator(_positive(units.parse_duration_s))]
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


# ============================================================================= models


class GpuRequest(_Model):
    """What GPUs the job needs: a model (any when None), how many per instance, min memory each."""

    name: str | None = None
    count: int = 1
    memory: SizeGB | None = None  # minimum GB per GPU

    @model_validator(mode="before")
    @classmethod
    def _split_memory_from_name(cls, data: Any) -> Any:
        """'A100-80GB' is the A100 with at least 80 GB."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return data
        from spotrun.gpus import parse_gpu

        name, memory = parse_gpu(data["name"])
        if name is None or memory is None:
            return data
        given = data.get("memory")
        if given is not None:
            try:
                clash = not math.isclose(units.parse_size_gb(given), memory)
            except ValueError:
                clash = False  # the memory field reports its own error
            if clash:
                raise _problem(
                    ("memory",),
                    f"{describe(given)} contradicts name {data['name']!r}, which says {memory:g} GB; "
                    "give the memory once",
                )
        return {**data, "name": name, "memory": memory}

    _name = field_validator("name", mode="before")(lambda v: None if v is None else _gpu_name(v))
    _count = field_validator("count", mode="before")(_whole(1, 16))

    @model_validator(mode="after")
    def _memory_fits_a_gpu(self) -> GpuRequest:
        """Refuse memory no GPU (of that name) has, and read a figure a little above an advertised
        size as that size: '80GiB' is 85.9 GB but means the 80 GB part, and must not exclude it."""
        from spotrun.gpus import GPU_MODELS

        if self.memory is None:
            return self
        models = [GPU_MODELS[self.name]] if self.name is not None else list(GPU_MODELS.values())
        sizes = sorted({size for model in models for size in model.all_memory_gb})
        near = [size for size in sizes if size < self.memory <= size * _MEMORY_SLACK]
        if near:
            self.memory = near[-1]
        elif self.memory > sizes[-1]:
            if self.name is not None:
                shown = " or ".join(f"{s:g}" for s in sizes)
                message = f"no {self.name} has {self.memory:g} GB; it comes with {shown} GB per GPU"
            else:
                biggest = max(models, key=lambda m: max(m.all_memory_gb))
                message = f"no GPU has {self.memory:g} GB; the largest is {biggest.name} with {sizes[-1]:g} GB"
            raise _problem(("memory",), message)
        return self


def _gpu_request(value: object) -> object:
    """`A100`, `A100:8`, `A100-80GB:2` -> a GpuRequest mapping; mappings pass through."""
    if value is None or isinstance(value, dict | GpuRequest):
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"expected a GPU like 'A100:1' or a mapping with name, count and memory, got {describe(value)}"
        )
    name, sep, count = value.strip().rpartition(":")
    if not sep:
        return {"name": value}
    if not re.fullmatch(r"\s*\d+\s*", count):
        raise ValueError(f"invalid GPU count {count!r} in {describe(value)}; write NAME:COUNT like 'A100:8'")
    if not 1 <= int(count) <= 16:
        raise ValueError(f"GPU count must be from 1 to 16, got {int(count)} in {describe(value)}")
    return {"name": name, "count": int(count)}


def _zone_in_region(zone: str, region: str) -> bool:
    """Could `zone` (a name or glob) lie in a region matching `region` (a glob)?

    Zones are named after their region plus a suffix (AWS 'us-east-1a', GCP 'us-central1-a'). For a
    zone glob only its literal prefix is compared, and anything undecidable counts as compatible:
    this check exists to catch contradictions, not to second-guess a plausible request.
    """
    literal = re.split(r"[*?\[]", zone, maxsplit=1)[0]
    if not literal:
        return True
    if literal == zone:
        return fnmatchcase(zone, region + "*")
    region_literal = re.split(r"[*?\[]", region, maxsplit=1)[0]
    return (
        fnmatchcase(literal, region + "*")
        or region_literal.startswith(literal)
        or (literal.startswith(region_literal) and region_literal != region)
    )


class Resources(_Model):
    """What an instance must offer, and where and how it may be bought."""

    gpu: GpuRequest | None = None
    cpus: int | None = None
    memory: SizeGB | None = None  # GB of RAM
    disk: SizeGB = 100.0  # GB
    providers: list[Literal["local", "aws", "gcp", "azure"]] | None = None
    regions: list[str] | None = None  # fnmatch globs
    zones: list[str] | None = None  # fnmatch globs
    spot: bool | Literal["auto"] = True
    max_price: USDPerHour | None = None  # USD per instance-hour

    _gpu = field_validator("gpu", mode="before")(_gpu_request)
    _cpus = field_validator("cpus", mode="before")(lambda v: None if v is None else _whole(1)(v))

    @field_validator("providers", mode="before")
    @classmethod
    def _providers(cls, value: object) -> object:
        if value is None:
            return None
        items = _str_list(value, "providers")
        problems = []
        for i, item in enumerate(items):
            try:
                items[i] = _choice(PROVIDERS, "provider")(item)
            except ValueError as exc:
                problems.append(((i,), str(exc), False))
        if problems:
            raise _Problems(problems)
        return list(dict.fromkeys(items))

    @field_validator("regions", mode="before")
    @classmethod
    def _regions(cls, value: object) -> object:
        return None if value is None else _str_list(value, "regions")

    @field_validator("zones", mode="before")
    @classmethod
    def _zones(cls, value: object) -> object:
        return None if value is None else _str_list(value, "zones")

    @field_validator("spot", mode="before")
    @classmethod
    def _spot(cls, value: object) -> object:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
            text = value.strip().lower()
            return text if text == "auto" else text == "true"
        raise ValueError(f"expected true, false or auto, got {describe(value)}")

    @model_validator(mode="after")
    def _zones_within_regions(self) -> Resources:
        if not self.zones or not self.regions:
            return self
        problems = []
        for i, zone in enumerate(self.zones):
            if zone.isdigit():  # Azure numbers its zones within each region: '1' fits any region
                continue
            if not any(_zone_in_region(zone, region) for region in self.regions):
                problems.append(
                    ((("zones", i)), f"zone {zone!r} is in none of the allowed regions "
                     f"({', '.join(self.regions)}); add its region or leave it out", False)
                )  # fmt: skip
        if problems:
            raise _Problems(problems)
        return self


class CheckpointSpec(_Model):
    dir: str = "/checkpoints"  # where the workload finds and writes checkpoints inside a container
    interval: Seconds | None = None  # seconds between periodic checkpoints the Agent asks for
    keep: int = 3  # completed checkpoints kept

    _keep = field_validator("keep", mode="before")(_whole(1))

    @field_validator("dir", mode="before")
    @classmethod
    def _dir(cls, value: object) -> str:
        text = _word(value)
        if not text.startswith("/"):
            raise ValueError(f"must be an absolute path inside the container, like '/checkpoints'; got {text!r}")
        return text


class RecoverySpec(_Model):
    max_restarts: int = 3  # retries after the job's own code fails (non-zero exit)
    max_preemptions: int | None = None  # None: no limit
    zone_cooldown: float = 1800.0  # seconds a zone is avoided after it preempted the job
    on_demand_fallback: Flag = True  # fall back to on-demand when no spot capacity fits
    policy: str = "spotrun"  # relaunch policy: spotrun, greedy, failover, uniform-progress, on-demand

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: object) -> object:
        from spotrun.policies import policy_names

        names = policy_names()
        if value not in names:
            raise ValueError(f"unknown policy {describe(value)}; allowed: {', '.join(names)}")
        return value

    _max_restarts = field_validator("max_restarts", mode="before")(_whole(0))
    _max_preemptions = field_validator("max_preemptions", mode="before")(lambda v: None if v is None else _whole(0)(v))
    _zone_cooldown = field_validator("zone_cooldown", mode="before")(units.parse_duration_s)


class WorkloadHint(_Model):
    """What the planner needs to estimate GPU memory and runtime without running the job."""

    model_params: ParamCount | None = None
    precision: Literal["fp32", "tf32", "bf16", "fp16", "int8"] = "bf16"
    optimizer: Literal["adamw", "adam", "sgd", "adafactor", "lion"] = "adamw"
    hours: Hours | None = None  # runtime on the reference GPU (one A100)
    hours_on: dict[str, float] = Field(default_factory=dict)  # GPU name -> runtime hours on it
    checkpoint_gb: SizeGB | None = None
    data_gb: SizeGB | None = None

    _precision = field_validator("precision", mode="before")(_choice(PRECISIONS, "precision"))
    _optimizer = field_validator("optimizer", mode="before")(_choice(OPTIMIZERS, "optimizer"))

    @field_validator("hours_on", mode="before")
    @classmethod
    def _hours_on(cls, value: object) -> object:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of GPU name to hours (like A100: 10), got {describe(value)}")
        out: dict[str, float] = {}
        problems: list[tuple[KeyPath, str, bool]] = []
        for key, hours in value.items():
            try:
                name = _gpu_name(key)
            except ValueError as exc:
                problems.append(((key,), str(exc), True))
                continue
            if name in out:
                problems.append(((key,), f"{key!r} is the same GPU as another key ({name}); give it once", True))
                continue
            try:
                out[name] = _positive(units.parse_hours)(hours)
            except ValueError as exc:
                problems.append(((key,), str(exc), False))
        if problems:
            raise _Problems(problems)
        return out


class LocalOptions(_Model):
    market: Path | None = None  # market file for the simulated spot market

    @field_validator("market", mode="before")
    @classmethod
    def _market(cls, value: object, info: ValidationInfo) -> object:
        return None if value is None else _local_path(value, info, want_dir=False, what="market file")


def _store_uri(value: object) -> object:
    """A store URI (file://, s3://, gs://, az://); None stays None."""
    if value is None:
        return None
    text = _word(value)
    if _uri(text, STORE_SCHEMES, "store scheme") is None:
        raise ValueError(f"expected a URI starting with file://, s3://, gs:// or az://, got {describe(text)}")
    return text


class _ProviderOptions(_Model):
    """Options shared by every cloud's section: `store` is where that cloud's instances keep the
    job's checkpoints (a job moved to another cloud has its checkpoint copied there first)."""

    store: str | None = None

    @field_validator("store", mode="before")
    @classmethod
    def _store(cls, value: object) -> object:
        return _store_uri(value)


class AWSOptions(_ProviderOptions):
    region: Word | None = None
    ami: Word | None = None
    instance_profile: Word | None = None
    subnet_id: Word | None = None
    security_group_id: Word | None = None


class GCPOptions(_ProviderOptions):
    project: Word | None = None
    image: Word | None = None
    service_account: Word | None = None
    network: Word | None = None


class AzureOptions(_ProviderOptions):
    subscription_id: Word | None = None
    resource_group: Word | None = None
    image: Word | None = None
    identity: Word | None = None


_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


def _env_refs(value: str) -> list[str]:
    """The `${...}` references in an env value (`$${` is a literal `${`)."""
    return [m.group(1) for m in _ENV_REF.finditer(value) if m.group(1) is not None]


def _expand(value: str, environ: Mapping[str, str]) -> str:
    """Expand `${VAR}` and `${VAR:-default}` from the launching environment; `$${` is a literal `${`."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return "${"
        ref = match.group(1)
        name, sep, default = ref.partition(":-")
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"invalid reference '${{{ref}}}'; use ${{NAME}} or ${{NAME:-default}}")
        if environ.get(name):
            return environ[name]
        if sep:
            return default
        if name in environ:
            return ""
        raise ValueError(
            f"environment variable {name} is not set; set it before launching or write "
            f"${{{name}:-default}} to give a default"
        )

    expanded = _ENV_REF.sub(substitute, value)
    rest = _ENV_REF.sub("", value)
    if "${" in rest:
        raise ValueError(f"unclosed '${{' in {describe(value)}; use ${{NAME}} or ${{NAME:-default}}")
    return expanded


def _uri(value: str, schemes: tuple[str, ...], what: str) -> re.Match[str] | None:
    """Match `scheme://rest` and check the scheme; None for a plain (local) path."""
    match = _URI.fullmatch(value)
    if match is None:
        return None
    scheme = match.group(1).lower()
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(f"unsupported {what} {scheme + '://'!r} in {describe(value)}; allowed: {allowed}")
    if scheme != "file" and not match.group(2).split("/", 1)[0]:
        raise ValueError(f"{describe(value)} names no bucket; write {scheme}://BUCKET/PATH")
    if scheme == "file" and not match.group(2):
        raise ValueError(f"{describe(value)} names no path; write file:///ABSOLUTE/PATH")
    return match


# Set by the loader, never read from the YAML file.
LOADER_FIELDS = frozenset({"source_path", "base_dir", "secret_env_keys"})
# Sections that may be written as an empty key (`checkpoint:`) to mean "the defaults".
_DEFAULTABLE = ("resources", "checkpoint", "recovery", "env", "data")


class JobSpec(_Model):
    """A validated job spec. Paths are absolute; sizes GB, durations seconds, money USD."""

    # Set by the loader (declared first so the validators below can read base_dir).
    source_path: Path | None = None
    base_dir: Path = Field(default_factory=Path.cwd)

    name: str
    resources: Resources = Field(default_factory=Resources)
    workdir: Path | None = None
    image: Word | None = None
    setup: str | None = None
    run: str
    env: dict[str, str] = Field(default_factory=dict)
    data: dict[str, str] = Field(default_factory=dict)  # source (abs local path or URI) -> target
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    budget: USD | None = None
    deadline: Seconds | None = None
    workload: WorkloadHint | None = None
    store: str | None = None
    local: LocalOptions | None = None
    aws: AWSOptions | None = None
    gcp: GCPOptions | None = None
    azure: AzureOptions | None = None

    # env keys whose value came from the launching environment (`${VAR}`): never persist their values.
    secret_env_keys: set[str] = Field(default_factory=set)

    # The `${...}` templates of the secret env values, as written in the spec: persisted instead of
    # the values, so a resumed job re-reads the secrets from its own environment.
    _env_templates: dict[str, str] = PrivateAttr(default_factory=dict)

    def persistable(self) -> dict[str, Any]:
        """The spec as JSON-ready data for State, holding no secret: env values that came from the
        environment are stored as their `${VAR}` templates, other values escaped ('${' -> '$${').
        `JobSpec.from_persisted` turns it back into the same spec."""
        data = self.model_dump(mode="json")
        env: dict[str, str] = {}
        for key, value in self.env.items():
            if key in self._env_templates:
                env[key] = self._env_templates[key]
            elif key not in self.secret_env_keys:
                env[key] = value.replace("${", "$${")
        data["env"] = env
        data["secret_env_keys"] = sorted(self.secret_env_keys)
        return data

    @classmethod
    def from_persisted(cls, data: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> JobSpec:
        """Rebuild a spec saved with `persistable()`, expanding the secret env templates from
        `environ` (default os.environ). Local paths are not checked again: a resumed job needs the
        uploaded bundle, not the files it came from. Raises SpecError."""
        context = {"environ": environ if environ is not None else os.environ, "check_paths": False}
        try:
            return cls.model_validate(dict(data), context=context)
        except ValidationError as exc:
            raise SpecError(issue for _, issue in _issues_from(exc, None, "<saved spec>")) from None

    @model_validator(mode="wrap")
    @classmethod
    def _prepare(cls, data: Any, handler: ModelWrapValidatorHandler[JobSpec]) -> JobSpec:
        """Empty sections mean the defaults; note which env values reference the environment.
        Raises nothing itself: problems are left to the field validators so all are reported."""
        if not isinstance(data, dict):
            return handler(data)
        data = {k: v for k, v in data.items() if not (k in _DEFAULTABLE and v is None)}
        env = data.get("env")
        templates: dict[str, str] = {}
        if isinstance(env, dict):
            templates = {k: v for k, v in env.items() if isinstance(k, str) and isinstance(v, str) and _env_refs(v)}
        data["secret_env_keys"] = set(data.get("secret_env_keys") or ()) | set(templates)
        spec = handler(data)
        spec._env_templates = templates
        return spec

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: object) -> str:
        text = _text(value)
        if _NAME.fullmatch(text):
            return text
        if len(text) > 63:
            raise ValueError(f"is {len(text)} characters long; at most 63 allowed")
        fixed = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
        fixed = (fixed if fixed[:1].isalpha() else f"job-{fixed}".rstrip("-"))[:63].rstrip("-")
        raise ValueError(
            f"invalid name {describe(text)}; use 1-63 lowercase letters, digits and '-', starting with a "
            f"letter and ending with a letter or digit (e.g. {fixed!r})"
        )

    @field_validator("workdir", mode="before")
    @classmethod
    def _workdir(cls, value: object, info: ValidationInfo) -> object:
        return None if value is None else _local_path(value, info, want_dir=True, what="folder")

    @field_validator("setup", mode="before")
    @classmethod
    def _setup(cls, value: object) -> object:
        return None if value is None or not _text(value).strip() else _text(value)

    @field_validator("run", mode="before")
    @classmethod
    def _run(cls, value: object) -> str:
        text = _text(value) if value is not None else ""
        if not text.strip():
            raise ValueError("must not be empty; give the command that starts training, e.g. 'python train.py'")
        return text

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: object, info: ValidationInfo) -> dict[str, str]:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of NAME: value, got {describe(value)}")
        environ = _environ(info)
        out: dict[str, str] = {}
        problems: list[tuple[KeyPath, str, bool]] = []
        for key, raw in value.items():
            if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
                problems.append(
                    ((key,), f"invalid variable name {describe(key)}; use letters, digits and '_', "
                     "not starting with a digit", True)
                )  # fmt: skip
                continue
            if key.upper().startswith("SPOTRUN_"):
                problems.append(((key,), "names starting with SPOTRUN_ are reserved for spotrun", True))
                continue
            if isinstance(raw, bool):
                raw = "true" if raw else "false"
            elif isinstance(raw, int | float):
                raw = str(raw)
            if not isinstance(raw, str):
                problems.append(
                    ((key,), f"expected text, a number or true/false, got {describe(raw)}"
                     + (" (write '' for an empty value)" if raw is None else ""), False)
                )  # fmt: skip
                continue
            try:
                out[key] = _expand(raw, environ)
            except ValueError as exc:
                problems.append(((key,), str(exc), False))
        if problems:
            raise _Problems(problems)
        return out

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, value: object, info: ValidationInfo) -> dict[str, str]:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of source: target path, got {describe(value)}")
        out: dict[str, str] = {}
        targets: dict[str, str] = {}  # target -> the source as written
        sources: dict[str, str] = {}  # resolved source -> the source as written
        problems: list[tuple[KeyPath, str, bool]] = []
        for source, target in value.items():
            try:
                source_text = _text(source).strip()
                if not source_text:
                    raise ValueError("the source must not be empty")
                match = _uri(source_text, DATA_SCHEMES, "data source scheme")
                if match is None or match.group(1).lower() == "file":
                    local = match.group(2) if match else source_text
                    source_text = str(_local_path(local, info, want_dir=None, what="data source"))
            except ValueError as exc:
                problems.append(((source,), str(exc), True))
                continue
            try:
                target_text = _data_target(target)
            except ValueError as exc:
                problems.append(((source,), str(exc), False))
                continue
            if target_text in targets:
                problems.append(
                    ((source,), f"target {target_text!r} is also the target of {targets[target_text]!r}", False)
                )
                continue
            if source_text in out:
                problems.append(((source,), f"the same source as {sources[source_text]!r}; give it once", True))
                continue
            targets[target_text] = sources[source_text] = str(source)
            out[source_text] = target_text
        if problems:
            raise _Problems(problems)
        return out

    @field_validator("store", mode="before")
    @classmethod
    def _store(cls, value: object) -> object:
        return _store_uri(value)


def _data_target(value: object) -> str:
    """A target path: absolute, or relative to SPOTRUN_DATA_DIR without climbing out of it."""
    text = _text(value).strip() if value is not None else ""
    if not text:
        raise ValueError("the target path must not be empty")
    if not text.startswith("/") and ".." in Path(text).parts:
        raise ValueError(f"relative target {text!r} must stay inside SPOTRUN_DATA_DIR (no '..')")
    return os.path.normpath(text)


# ============================================================================= pydantic errors -> issues


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


# ============================================================================= loading


def load_spec(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> JobSpec:
    """Read and validate a job spec file. Raises SpecError (and nothing else) when it is unusable.

    Relative paths in the spec are resolved against the file's folder; `${VAR}` in `env` values is
    expanded from `environ` (default: os.environ).
    """
    display = os.fspath(path)
    try:
        file = Path(display).expanduser()
        with open(file, "rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError([SpecIssue(display, None, None, "", "file not found")]) from None
    except IsADirectoryError:
        raise SpecError([SpecIssue(display, None, None, "", "is a folder, expected a YAML file")]) from None
    except PermissionError:
        raise SpecError([SpecIssue(display, None, None, "", "permission denied")]) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SpecError([SpecIssue(display, None, None, "", f"cannot read the file: {reason}")]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([SpecIssue(display, None, None, "", f"too large for a job spec (over {MAX_SPEC_BYTES} bytes)")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        message = f"not a text file: byte 0x{raw[exc.start]:02x} is not valid UTF-8"
        raise SpecError([SpecIssue(display, line, column, "", message)]) from None
    resolved = file.resolve()
    return _parse(text, display, base_dir=resolved.parent, source_path=resolved, environ=environ)


def parse_spec_text(
    text: str,
    filename: str = "<spec>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> JobSpec:
    """Validate spec text. `filename` is only used in messages; relative paths are resolved against
    `base_dir` (default: the current folder). Raises SpecError."""
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    return _parse(text, filename, base_dir=base, source_path=None, environ=environ)


def _parse(
    text: str, file: str, *, base_dir: Path, source_path: Path | None, environ: Mapping[str, str] | None
) -> JobSpec:
    try:
        return _validate(text, file, base_dir, source_path, environ)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError([SpecIssue(file, 1, 1, "", "the YAML is nested too deeply")]) from None
    except Exception as exc:  # a bug in spotrun: still no traceback for the user, but say what it was
        message = f"internal error while validating the spec ({type(exc).__name__}: {exc}); please report it"
        raise SpecError([SpecIssue(file, None, None, "", message)]) from exc


def _validate(
    text: str, file: str, base_dir: Path, source_path: Path | None, environ: Mapping[str, str] | None
) -> JobSpec:
    if not isinstance(text, str):
        raise SpecError([SpecIssue(file, None, None, "", f"expected text, got {describe(text)}")])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        (line, column), message = yaml_problem(exc, text)
        raise SpecError([SpecIssue(file, line, column, "", message)]) from None
    if root is None:
        raise SpecError([SpecIssue(file, 1, 1, "", "the file is empty; a job spec needs at least 'name' and 'run'")])
    reader = Reader()
    try:
        data = reader.read(root)
    except TooBig:
        raise SpecError(
            [SpecIssue(file, 1, 1, "", f"the YAML expands to more than {MAX_NODES} values (aliases?)")]
        ) from None
    issues: list[tuple[KeyPath, SpecIssue]] = [
        (path, SpecIssue(file, line, column, _join_path(path), message))
        for path, (line, column), message, _ in reader.problems
    ]
    if not isinstance(data, dict):
        if issues:  # the root itself was refused (an unsupported tag): that is the whole story
            raise SpecError(issue for _, issue in issues)
        line, column = node_mark(root)
        issues.append(((), SpecIssue(
            file, line, column, "",
            f"expected a mapping of keys at the top level (like 'name: my-job'), got {describe(data)}",
        )))  # fmt: skip
        raise SpecError(issue for _, issue in issues)

    for key in [k for k in data if k.startswith("x-")]:  # extension keys, e.g. to hold YAML anchors
        del data[key]
    for key in LOADER_FIELDS & set(data):
        line, column = reader.where[(key,)].key or (1, 1)
        issues.append(((key,), SpecIssue(file, line, column, key, _unknown_key_message((), key))))
        del data[key]
    env = data.get("env")
    if isinstance(env, dict):  # env values keep their source text: `VERSION: 1.10` stays '1.10'
        for key, value in env.items():
            node = reader.where[("env", key)].node
            if isinstance(node, ScalarNode) and value is not None and not isinstance(value, str):
                env[key] = node.value

    context = {"base_dir": base_dir, "environ": environ if environ is not None else os.environ}
    try:
        spec = JobSpec.model_validate({**data, "base_dir": base_dir, "source_path": source_path}, context=context)
    except ValidationError as exc:
        suppressed = [path for path, _, _, suppress in reader.problems if suppress]
        issues.extend(
            (path, issue)
            for path, issue in _issues_from(exc, reader, file)
            if not any(path[: len(s)] == s for s in suppressed)
        )
        spec = None
    if issues:
        raise SpecError(issue for _, issue in issues)
    assert spec is not None
    return spec
