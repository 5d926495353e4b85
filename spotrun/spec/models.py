"""The job spec's models (pydantic): what each key means, its type, its default and its checks."""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

import spotrun.spec.units as units
from spotrun.spec.fields import (
    _MEMORY_SLACK,
    DATA_SCHEMES,
    OPTIMIZERS,
    PRECISIONS,
    PROVIDERS,
    STORE_SCHEMES,
    USD,
    Flag,
    Hours,
    ParamCount,
    PlainGB,
    Seconds,
    SizeGB,
    USDPerHour,
    Word,
    _choice,
    _environ,
    _gpu_name,
    _local_path,
    _Model,
    _positive,
    _str_list,
    _text,
    _unit_required,
    _whole,
    _word,
)
from spotrun.spec.issues import SpecError, _did_you_mean, _problem, _Problems
from spotrun.spec.units import describe
from spotrun.spec.yamlpos import KeyPath


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
        return {**data, "name": name, "memory": f"{memory:g}GB"}

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


def _known_places(market: Path | None) -> tuple[set[str], set[str]]:
    """(regions, zones) of every offer in the bundled catalog and of the local market."""
    from spotrun.catalog import bundled_offers
    from spotrun.clouds.local.market import load_market

    offers = bundled_offers()
    regions = {o.region for o in offers if o.region}
    zones = {o.zone for o in offers if o.zone}
    try:
        local = load_market(market)
        regions |= {z.region for z in local.spec.zones}
        zones |= {z.zone for z in local.spec.zones}
    except (ValueError, OSError):  # a broken market file is reported by its own field
        pass
    return regions, zones


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
    nodes: int = 1  # instances run as one gang (multi-node training): all start together, one zone

    _gpu = field_validator("gpu", mode="before")(_gpu_request)
    _cpus = field_validator("cpus", mode="before")(lambda v: None if v is None else _whole(1)(v))
    _nodes = field_validator("nodes", mode="before")(lambda v: 1 if v is None else _whole(1)(v))

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


_BOOT_TIMEOUT = _unit_required(units.parse_duration_s, "duration", "m", "10m, 15m")


class RecoverySpec(_Model):
    max_restarts: int = 3  # retries after the job's own code fails (non-zero exit)
    max_preemptions: int | None = None  # None: no limit
    zone_cooldown: float = 1800.0  # seconds a zone is avoided after it preempted the job
    on_demand_fallback: Flag = True  # fall back to on-demand when no spot capacity fits
    policy: str = "spotrun"  # relaunch policy: spotrun, greedy, failover, uniform-progress, on-demand
    capacity_wait: float = 600.0  # real seconds to keep retrying (with backoff) while no offer has capacity
    max_boot_failures: int = 3  # attempts whose VM never started the Agent, before the job fails
    boot_timeout: float | None = None  # seconds from "VM running" to the Agent's start; None: the cloud's default

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
    _zone_cooldown = field_validator("zone_cooldown", mode="before")(
        _unit_required(units.parse_duration_s, "duration", "m", "30m, 1h")
    )
    _capacity_wait = field_validator("capacity_wait", mode="before")(
        _unit_required(units.parse_duration_s, "duration", "m", "10m, 1h")
    )
    _max_boot_failures = field_validator("max_boot_failures", mode="before")(_whole(1))

    @field_validator("boot_timeout", mode="before")
    @classmethod
    def _boot_timeout(cls, value: object, info: ValidationInfo) -> float | None:
        return None if value is None else _BOOT_TIMEOUT(value, info)


class WorkloadHint(_Model):
    """What the planner needs to estimate GPU memory and runtime without running the job."""

    model_params: ParamCount | None = None
    precision: Literal["fp32", "tf32", "bf16", "fp16", "int8"] = "bf16"
    optimizer: Literal["adamw", "adam", "sgd", "adafactor", "lion"] = "adamw"
    hours: Hours | None = None  # runtime on the reference GPU (one A100)
    hours_on: dict[str, float] = Field(default_factory=dict)  # GPU name -> runtime hours on it
    checkpoint_gb: PlainGB | None = None
    data_gb: PlainGB | None = None

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
        if value is None:
            return None
        path = _local_path(value, info, want_dir=False, what="market file")
        context = info.context if isinstance(info.context, Mapping) else {}
        if context.get("check_paths", True):  # a broken market fails `validate`, not `plan` later
            from spotrun.clouds.local.market import load_market  # the simulated market's own parser

            try:
                load_market(path)
            except (ValueError, OSError, RecursionError) as e:  # MarketError names the market file's line
                raise ValueError(f"market file {str(path)!r} is not usable: {e}") from None
        return path


def _store_uri(value: object) -> object:
    """A store URI (file://, s3://, gs://, az://); None stays None."""
    if value is None:
        return None
    text = _word(value)
    if _uri(text, STORE_SCHEMES, "store scheme") is None:
        raise ValueError(f"expected a URI starting with file://, s3://, gs:// or az://, got {describe(text)}")
    return text


LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
MAX_LABELS = 32


def _labels(value: object) -> dict[str, str]:
    """Labels, in the rules every cloud accepts (GCP's are the strictest): keys start with a
    lowercase letter, keys and values hold lowercase letters, digits, '_' and '-', 63 at most."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of key: value, like {{team: nlp}}, got {describe(value)}")
    if len(value) > MAX_LABELS:
        raise ValueError(f"{len(value)} labels; at most {MAX_LABELS} allowed")
    out: dict[str, str] = {}
    problems: list[tuple[KeyPath, str, bool]] = []
    for key, raw in value.items():
        if not isinstance(key, str) or not LABEL_KEY.fullmatch(key) or key.startswith("spotrun"):
            problems.append(((str(key),), "a label key is 1-63 of a-z 0-9 _ -, starting with a letter "
                             "(keys starting with 'spotrun' are reserved)", True))  # fmt: skip
            continue
        text = str(raw).lower() if isinstance(raw, bool) else str(raw) if isinstance(raw, int | float) else raw
        if not isinstance(text, str) or not LABEL_VALUE.fullmatch(text):
            problems.append(((key,), f"a label value is 0-63 of a-z 0-9 _ -; got {describe(raw)}", False))
            continue
        out[key] = text
    if problems:
        raise _Problems(problems)
    return out


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
    subnet_nat: bool | None = None  # the subnet reaches the internet through a NAT: no public IP


class GCPOptions(_ProviderOptions):
    project: Word | None = None
    image: Word | None = None
    service_account: Word | None = None
    network: Word | None = None
    cloud_nat: bool | None = None  # the network has Cloud NAT: no external IP


class AzureOptions(_ProviderOptions):
    subscription_id: Word | None = None
    resource_group: Word | None = None
    image: Word | None = None
    identity: Word | None = None
    subnet_nat: bool | None = None  # subnet_id has a NAT gateway: no public IP


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
    labels: dict[str, str] = Field(default_factory=dict)  # job labels; also tags/labels on cloud resources
    data: dict[str, str] = Field(default_factory=dict)  # source (abs local path or URI) -> target
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    budget: USD | None = None
    deadline: Seconds | None = None
    workload: WorkloadHint | None = None
    store: str | None = None
    # where `launch --detach` hands the job: this machine, or the store's controller host (issue 16);
    # None: the config file's `controller` (default local)
    controller: Literal["local", "cloud"] | None = None
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
        from spotrun.spec.report import _issues_from  # report reads these models: imported here, not above

        context = {
            "environ": environ if environ is not None else os.environ,
            "check_paths": False,
            "units_implied": True,
        }
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

    @model_validator(mode="after")
    def _places_exist(self, info: ValidationInfo) -> JobSpec:
        """Regions and zones (names or globs) must name a place some cloud in the catalog, or the
        local market, has: `mars-east-1` is refused at `validate`, not found missing at launch."""
        context = info.context if isinstance(info.context, Mapping) else {}
        r = self.resources
        if not context.get("check_paths", True) or not (r.regions or r.zones):
            return self
        regions, zones = _known_places(self.local.market if self.local else None)
        problems = []
        for i, region in enumerate(r.regions or []):
            if not fnmatch.filter(regions, region):
                hint = _did_you_mean(region, sorted(regions))
                problems.append(((("resources", "regions", i)), f"no cloud has a region {region!r}{hint}", False))
        for i, zone in enumerate(r.zones or []):
            if zone.isdigit() or fnmatch.filter(zones, zone) or any(_zone_in_region(zone, g) for g in regions):
                continue
            problems.append(
                (
                    (("resources", "zones", i)),
                    f"no cloud has a zone {zone!r}{_did_you_mean(zone, sorted(zones))}",
                    False,
                )
            )
        if problems:
            raise _Problems(problems)
        return self

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

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: object) -> dict[str, str]:
        return _labels(value)


def _data_target(value: object) -> str:
    """A target path: absolute, or relative to SPOTRUN_DATA_DIR without climbing out of it."""
    text = _text(value).strip() if value is not None else ""
    if not text:
        raise ValueError("the target path must not be empty")
    if not text.startswith("/") and ".." in Path(text).parts:
        raise ValueError(f"relative target {text!r} must stay inside SPOTRUN_DATA_DIR (no '..')")
    return os.path.normpath(text)
