"""The local provider's simulated spot market: zones, prices, interruptions, outages, traces.

A market file (YAML) describes each zone of the market (price, GPU, interruption rate, notice,
capacity, outages) and, optionally, a real availability trace that drives it. `load_market`
validates it (errors name the file, the line and the key) and returns a `Market`, which answers
the questions the local provider asks:

* `offers(t)`: the market as catalog rows (provider "local").
* `unavailable(pool, t, spot)`: why a launch in that pool at market time `t` fails now, or None.
* `schedule(pool, spot, k, t)`: when the k-th spot instance launched in the pool at time `t` is
  preempted, and how much notice it gets.

Each entry of `zones:` is one *pool* (AWS's word: a zone × instance type), the unit that has its own
price, interruption rate, capacity and outages; a zone may list several instance types. A pool is
named `"<zone>/<instance_type>"`, as in `Offer.key` without the provider.

Time: the processes run in *real* seconds, and every duration in the file (notice, boot,
preempt_after, outages, trace ticks) is in real seconds. `time_scale` says how many simulated
seconds one real second stands for: prices are per simulated hour and interruption rates are
per simulated hour, so a time_scale of 60 turns an hour of spot market into a real minute.
Market time `t` is real seconds since the market's epoch (the local provider keeps one per job).

Everything is a pure function of the file and its `seed`, so a schedule can be reproduced.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer

BUILTIN_MARKETS = ("default", "quickstart")


class MarketError(ValueError):
    """The market file is missing, malformed or inconsistent. The message says where and why."""


# --------------------------------------------------------------------------- the file's schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TraceSpec(_Strict):
    """A real availability trace replayed in compressed time: one tick lasts `tick_seconds`."""

    path: str | None = None  # a trace file (any format spotrun.simulate.traces reads), relative to the market file
    zone: str | None = None  # which of the file's zones (its name or key); needed when the file holds several
    nodes: PositiveInt = 1  # for count-valued traces: available when at least this many instances were
    available: list[bool] | None = None  # an inline series instead of a file (True = spot available)
    gap_seconds: PositiveFloat | None = None  # trace seconds per tick (inline series; files carry their own)
    tick_seconds: PositiveFloat | None = None  # real seconds per tick; default gap_seconds / time_scale
    start_tick: NonNegativeInt = 0  # where in the trace the market's epoch falls
    loop: bool = False  # after the last tick start over (default: the last tick's state holds)

    @model_validator(mode="after")
    def _one_source(self) -> TraceSpec:
        if (self.path is None) == (self.available is None):
            raise ValueError("give exactly one of 'path' (a trace file) or 'available' (an inline series)")
        if self.available is not None:
            if not self.available:
                raise ValueError("'available' is empty")
            if self.start_tick >= len(self.available):
                raise ValueError(f"start_tick {self.start_tick} is past the {len(self.available)} ticks of 'available'")
            if self.gap_seconds is None and self.tick_seconds is None:
                raise ValueError("an inline trace needs 'tick_seconds' (real seconds per tick) or 'gap_seconds'")
        return self


class ZoneSpec(_Strict):
    zone: str = Field(min_length=1)
    region: str = Field(min_length=1)
    instance_type: str = Field(min_length=1)
    gpu: str | None = None
    gpu_count: NonNegativeInt = 0
    gpu_memory_gb: NonNegativeFloat = 0.0
    vcpus: PositiveFloat
    memory_gb: PositiveFloat
    spot_price: NonNegativeFloat | None = None  # USD per simulated hour; None: no spot here (or: from the trace)
    ondemand_price: NonNegativeFloat | None = None
    interruption_rate: NonNegativeFloat | None = None  # preemptions per simulated hour; default 0 (trace: measured)
    preempt_after: list[NonNegativeFloat] = Field(default_factory=list)
    outages: list[tuple[NonNegativeFloat, NonNegativeFloat]] = Field(default_factory=list)
    capacity: PositiveInt | None = None
    notice: NonNegativeFloat | None = None  # overrides the market's notice; 0 = killed without notice
    trace: TraceSpec | None = None

    @property
    def pool(self) -> str:
        return pool_key(self.zone, self.instance_type)

    @field_validator("outages")
    @classmethod
    def _ordered(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for start, end in v:
            if end <= start:
                raise ValueError(f"outage [{start}, {end}] must end after it starts")
        return sorted(v)

    @model_validator(mode="after")
    def _consistent(self) -> ZoneSpec:
        if self.gpu is not None and self.gpu_count < 1:
            raise ValueError(f"gpu {self.gpu!r} needs gpu_count >= 1")
        if self.gpu is None and self.gpu_count:
            raise ValueError("gpu_count is set but gpu (the model name) is not")
        if self.ondemand_price is None and self.spot_price is None and self.trace is None:
            raise ValueError("a zone needs a spot_price, an ondemand_price or a trace with prices")
        return self


class MarketSpec(_Strict):
    name: str = ""
    description: str = ""
    time_scale: PositiveFloat = 60.0
    notice: NonNegativeFloat = 5.0
    boot: NonNegativeFloat = 0.5
    seed: int = 0
    zones: list[ZoneSpec] = Field(min_length=1)

    @field_validator("zones")
    @classmethod
    def _unique(cls, v: list[ZoneSpec]) -> list[ZoneSpec]:
        seen: set[str] = set()
        for z in v:
            if z.pool in seen:
                raise ValueError(f"zone {z.zone!r} lists instance type {z.instance_type!r} twice")
            seen.add(z.pool)
        return v


# --------------------------------------------------------------------------- trace replay


@dataclass
class Replay:
    """A zone's availability series mapped onto market time (real seconds since the epoch)."""

    available: tuple[bool, ...]
    prices: tuple[float | None, ...] | None
    tick_seconds: float  # real seconds per tick
    start_tick: int
    loop: bool
    label: str = ""
    down: tuple[int, ...] = field(init=False)  # the unavailable ticks, ascending

    def __post_init__(self) -> None:
        self.down = tuple(i for i, a in enumerate(self.available) if not a)

    def _raw(self, t: float) -> int:
        return self.start_tick + int(math.floor(max(0.0, t) / self.tick_seconds))

    def _index(self, raw: int) -> int:
        n = len(self.available)
        return raw % n if self.loop else min(raw, n - 1)

    def available_at(self, t: float) -> bool:
        return self.available[self._index(self._raw(t))]

    def price_at(self, t: float) -> float | None:
        if self.prices is None:
            return None
        return self.prices[self._index(self._raw(t))]

    def next_unavailable(self, t: float) -> float | None:
        """The first market time >= t at which spot is unavailable; None if never again."""
        down = self.down
        if not down:
            return None
        n, raw = len(self.available), self._raw(t)
        if not self.loop and raw >= n - 1:
            return t if not self.available[n - 1] else None
        pos = raw % n if self.loop else raw
        base = raw - pos
        k = bisect.bisect_left(down, pos)
        if k < len(down):
            target = base + down[k]
        elif self.loop:
            target = base + n + down[0]
        else:
            return None
        if target == raw:
            return max(t, 0.0)
        return (target - self.start_tick) * self.tick_seconds

    def availability(self) -> float:
        """Share of the trace's ticks with spot available."""
        return 1.0 - len(self.down) / len(self.available)

    def preemptions_per_real_second(self) -> float:
        """Available -> unavailable transitions per real second of replay (loop-aware)."""
        a = self.available
        drops = sum(1 for i in range(1, len(a)) if a[i - 1] and not a[i])
        if self.loop and a[-1] and not a[0]:
            drops += 1
        return drops / (len(a) * self.tick_seconds)


def _load_replay(trace: TraceSpec, base_dir: Path, time_scale: float, cache: dict[Any, Any]) -> Replay:
    """The zone's trace on market time. `cache` keeps each file's traces for the other zones."""
    if trace.available is not None:
        gap = trace.gap_seconds
        tick = trace.tick_seconds if trace.tick_seconds is not None else gap / time_scale  # type: ignore[operator]
        return Replay(tuple(trace.available), None, tick, trace.start_tick, trace.loop, "inline")
    from spotrun.simulate.traces import load_traces

    path = Path(trace.path).expanduser()  # type: ignore[arg-type]
    if not path.is_absolute():
        path = base_dir / path
    if not path.exists():
        raise MarketError(f"trace file not found: {path}")
    key = (path.resolve(), trace.nodes)
    if key not in cache:
        try:
            cache[key] = load_traces([path], nodes=trace.nodes)
        except ValueError as e:
            raise MarketError(f"trace {path}: {e}") from None
    found = cache[key]
    if trace.zone is not None:
        chosen = [z for z in found if trace.zone in (z.name, z.key)]
    else:
        chosen = found if len(found) == 1 else []
    if len(chosen) != 1:
        names = ", ".join(sorted({z.key for z in found})) or "none"
        what = f"no zone {trace.zone!r}" if trace.zone is not None else "several zones; name one with 'zone'"
        raise MarketError(f"trace {path}: {what} (it has: {names})")
    zt = chosen[0]
    if not zt.available:
        raise MarketError(f"trace {path}: zone {zt.key} has no ticks")
    if trace.start_tick >= len(zt.available):
        raise MarketError(f"trace {path}: start_tick {trace.start_tick} is past its {len(zt.available)} ticks")
    tick = trace.tick_seconds if trace.tick_seconds is not None else zt.gap_seconds / time_scale
    prices = None
    if zt.prices is not None:
        prices = tuple(None if p is None or (isinstance(p, float) and math.isnan(p)) else float(p) for p in zt.prices)
    available = tuple(bool(a) for a in zt.available)
    return Replay(available, prices, tick, trace.start_tick, trace.loop, f"{path.name}:{zt.key}")


# --------------------------------------------------------------------------- the market


@dataclass(frozen=True)
class LaunchPlan:
    """What will become of one launched instance, decided when it is launched."""

    preempt_in: float | None  # real seconds after launch at which the notice goes out; None: never
    notice: float  # real seconds between the notice and the kill (0: no notice)
    cause: str  # "preempt_after[k]", "rate", "outage", "trace" or "" when never preempted


def pool_key(zone: str, instance_type: str) -> str:
    return f"{zone}/{instance_type}"


@dataclass(frozen=True)
class Pool:
    """One entry of `zones:` with its trace loaded: a zone x instance type."""

    spec: ZoneSpec
    replay: Replay | None
    notice: float  # the effective notice period

    @property
    def key(self) -> str:
        return self.spec.pool

    def interruption_rate(self, time_scale: float) -> float:
        """Preemptions per simulated hour, as the planner should see them."""
        if self.spec.interruption_rate is not None:
            return self.spec.interruption_rate
        if self.replay is not None:
            return self.replay.preemptions_per_real_second() * 3600.0 / time_scale
        return 0.0


class Market:
    def __init__(self, spec: MarketSpec, *, source: str = "", digest: str = "", base_dir: Path | None = None) -> None:
        self.spec = spec
        self.source = source
        self.digest = digest or hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
        base = base_dir or Path.cwd()
        pools: dict[str, Pool] = {}
        cache: dict[Any, Any] = {}
        for i, z in enumerate(spec.zones):
            try:
                replay = _load_replay(z.trace, base, spec.time_scale, cache) if z.trace is not None else None
            except MarketError as e:
                raise MarketError(f"{source or 'market'}: zones[{i}].trace: {e}") from None
            no_trace_price = replay is None or replay.prices is None
            if z.spot_price is None and z.ondemand_price is None and no_trace_price:
                raise MarketError(f"{source or 'market'}: zones[{i}] ({z.zone}): no price (the trace has none)")
            pools[z.pool] = Pool(z, replay, spec.notice if z.notice is None else z.notice)
        self.pools = pools

    # ----------------------------------------------------------------- simple facts

    @property
    def time_scale(self) -> float:
        return self.spec.time_scale

    @property
    def boot(self) -> float:
        return self.spec.boot

    def pool(self, zone: str, instance_type: str) -> Pool | None:
        return self.pools.get(pool_key(zone, instance_type))

    def spot_price(self, pool: str, t: float = 0.0) -> float | None:
        z = self.pools[pool]
        if z.spec.spot_price is not None:
            return z.spec.spot_price
        return z.replay.price_at(t) if z.replay is not None else None

    def offers(self, t: float = 0.0) -> list[Offer]:
        """The market as catalog rows, with spot prices as of market time `t`."""
        from spotrun.catalog.model import Offer

        out = []
        for z in self.pools.values():
            s = z.spec
            out.append(
                Offer(
                    provider="local",
                    region=s.region,
                    zone=s.zone,
                    instance_type=s.instance_type,
                    gpu=s.gpu,
                    gpu_count=s.gpu_count,
                    gpu_memory_gb=s.gpu_memory_gb,
                    vcpus=s.vcpus,
                    memory_gb=s.memory_gb,
                    spot_price=self.spot_price(z.key, t),
                    ondemand_price=s.ondemand_price,
                    interruption_rate=z.interruption_rate(self.time_scale),
                    # "trace": measured over the replayed trace itself; planners may use it,
                    # relaunch policies must not (spotrun/control/decide.py).
                    interruption_source="trace" if s.interruption_rate is None and z.replay else "market",
                    availability=None if z.replay is None else z.replay.availability(),
                )
            )
        return out

    # ----------------------------------------------------------------- behaviour

    def unavailable(self, pool: str, t: float, *, spot: bool) -> str | None:
        """Why a launch in `pool` at market time `t` fails (capacity aside), or None if it can start."""
        z = self.pools.get(pool)
        if z is None:
            return f"the local market has no {pool!r} (zone/instance type)"
        if spot and self.spot_price(pool, t) is None:
            return f"{pool}: no spot offered"
        if not spot and z.spec.ondemand_price is None:
            return f"{pool}: no on-demand offered"
        for start, end in z.spec.outages:
            if start <= t < end:
                return f"{pool}: capacity outage until market time {end:g}s"
        if spot and z.replay is not None and not z.replay.available_at(t):
            return f"{pool}: no spot capacity (trace {z.replay.label})"
        return None

    def schedule(self, pool: str, *, spot: bool, launch_index: int, t: float) -> LaunchPlan:
        """The fate of an instance launched in `pool` at market time `t`.

        `launch_index` counts the spot instances launched in this pool before (0 for the first).
        On-demand instances are never preempted. A spot instance is preempted at the earliest of:
        `boot + preempt_after[k]` (or, beyond that list and without a trace, `boot` plus an
        exponential draw at `interruption_rate`, seeded by (seed, pool, k)); the start of the
        pool's next outage; the next tick at which its trace says spot is unavailable.
        """
        z = self.pools[pool]
        if not spot:
            return LaunchPlan(None, z.notice, "")
        events: list[tuple[float, str]] = []
        after = z.spec.preempt_after
        if launch_index < len(after):
            events.append((self.boot + after[launch_index], f"preempt_after[{launch_index}]"))
        elif z.replay is None:
            rate = z.interruption_rate(self.time_scale) * self.time_scale / 3600.0  # per real second
            if rate > 0:
                rng = random.Random(f"{self.spec.seed}/{pool}/{launch_index}")
                events.append((self.boot + rng.expovariate(rate), "rate"))
        for start, _end in z.spec.outages:
            if start > t:
                events.append((start - t, "outage"))
                break
        if z.replay is not None:
            down = z.replay.next_unavailable(t)
            if down is not None:
                events.append((max(0.0, down - t), "trace"))
        if not events:
            return LaunchPlan(None, z.notice, "")
        at, cause = min(events)
        return LaunchPlan(at, z.notice, cause)


# --------------------------------------------------------------------------- loading


def builtin_market_path(name: str) -> Path:
    return Path(str(resources.files("spotrun") / "markets" / f"{name}.yaml"))


def resolve_market_path(market: str | Path | None) -> Path:
    """A market file: a path, or the name of a built-in market ("default", "quickstart")."""
    if market is None:
        return builtin_market_path("default")
    path = Path(market).expanduser()
    if path.exists():
        return path
    if str(market) in BUILTIN_MARKETS:
        return builtin_market_path(str(market))
    raise MarketError(f"market file not found: {market} (built-in markets: {', '.join(BUILTIN_MARKETS)})")


def load_market(market: str | Path | None = None) -> Market:
    path = resolve_market_path(market)
    try:
        text = path.read_text()
    except OSError as e:
        raise MarketError(f"cannot read market file {path}: {e}") from None
    return parse_market(text, source=str(path), base_dir=path.parent)


def parse_market(text: str, *, source: str = "<market>", base_dir: Path | None = None) -> Market:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise MarketError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise MarketError(f"{source}: a market file is a mapping with 'zones:' (and time_scale, notice, ...)")
    try:
        spec = MarketSpec.model_validate(data)
    except ValidationError as e:
        raise MarketError(_explain(e, source, root)) from None
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Market(spec, source=source, digest=digest, base_dir=base_dir)


def _explain(err: ValidationError, source: str, root: yaml.Node | None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
        line = _line_of(root, loc)
        where = f"{source}:{line}" if line else source
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (allowed: {', '.join(_allowed(loc))})"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{where}: {key or 'market'}: {msg}")
    return "invalid market file:\n  " + "\n  ".join(lines)


def _allowed(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = MarketSpec
    for p in loc[:-1]:
        model = {"zones": ZoneSpec, "trace": TraceSpec}.get(p, model) if isinstance(p, str) else model
    return list(model.model_fields)


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (the deepest one that exists)."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for depth, p in enumerate(loc):
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == p:
                    nxt = k if depth == len(loc) - 1 else v  # a key's own line, not its block's
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(p, int) and p < len(node.value):
            nxt = node.value[p]
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    return line
