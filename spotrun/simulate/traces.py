"""Loaders for real spot-availability and spot-price traces, on one common shape.

Every source in ``shared/data`` has its own file layout *and its own 0/1 convention*
(see ``PROVENANCE.md``); this module is the one place that knows them. Whatever the
source, a :class:`ZoneTrace` says, per tick, whether a spot instance could be had
(``True`` = available) and, where the source has it, the spot price at that tick.

Formats handled (detected from the file's content, so renamed files still load):

* ``skypilot``       Can't-Be-Late JSON ``{"metadata": {"gap_seconds"}, "data": [count...]}``
                     (preemption traces add ``"prices": [...]``); value = instances obtained,
                     available when ``>= nodes``.
* ``skynomad``       SkyNomad merged JSON (``metadata`` has ``zone``/``start_time``/``price_info``);
                     *preempted* convention: 1 = unavailable. Gap-filled ticks are flagged.
* ``skypilot-raw``   ``clock,timestamp,fail`` CSV; 1 = launch FAILED (unavailable).
* ``skynomad-probes`` one row per (10-minute round, zone): available when
                     ``instances_created >= nodes``; per-GPU spot price where recorded.
* ``bamboo-events``  ``delta_ms,add|remove,node`` cluster event list -> live node count.
* ``bamboo-gcloud``  ``YYYY-MM-DD, HH:MM:SS, N`` instance-count samples.
* ``bamboo-doc``     ``x,y`` step series (x seconds, or hours in ``*_scaled`` files).
* ``aws-price-history`` DescribeSpotPriceHistory dump (training_on_a_dime): one price trace
                     per (zone, instance type); availability is always true.
* ``gcp-price-history`` Cyclenerd GCP GPU VM price-change log: one spot price trace per
                     (region, machine type), with its on-demand price.

Count-valued sources also keep the raw count in ``ZoneTrace.capacity`` so a caller can
re-threshold for a gang of N nodes with :meth:`ZoneTrace.with_nodes`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = [
    "ZoneTrace",
    "load_trace",
    "load_traces",
    "detect_format",
    "region_of",
    "TraceFormatError",
]


class TraceFormatError(ValueError):
    """A file that is not one of the known trace formats (or is malformed)."""


_AWS_ZONE = re.compile(r"^([a-z]{2}(?:-gov)?-[a-z]+-\d+)[a-z]$")
_GCP_ZONE = re.compile(r"^([a-z]+-[a-z]+\d+)-[a-z]$")


def region_of(zone: str) -> str:
    """The region a zone id belongs to (``us-west-2a`` -> ``us-west-2``, ``us-east4-b`` -> ``us-east4``)."""
    for pat in (_AWS_ZONE, _GCP_ZONE):
        m = pat.match(zone)
        if m:
            return m.group(1)
    return zone


@dataclass
class ZoneTrace:
    """Spot availability (and price) of one zone over time, one value per tick.

    Tick ``i`` covers ``[i*gap_seconds, (i+1)*gap_seconds)`` seconds after ``start``.
    ``available[i]`` is already normalized: True means a spot instance could be had.
    """

    name: str
    source: str
    gap_seconds: float
    available: list[bool]
    prices: list[float] | None = None
    ondemand_price: float | None = None
    start: datetime | None = None
    instance: str | None = None
    capacity: list[int] | None = None
    filled: list[bool] | None = None
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gap_seconds <= 0:
            raise TraceFormatError(f"{self.name}: gap_seconds must be > 0")
        n = len(self.available)
        for label, seq in (("prices", self.prices), ("capacity", self.capacity), ("filled", self.filled)):
            if seq is not None and len(seq) != n:
                raise TraceFormatError(f"{self.name}: {label} has {len(seq)} ticks, available has {n}")

    @property
    def region(self) -> str:
        return region_of(self.name)

    @property
    def key(self) -> str:
        """A unique label: the zone, plus the instance kind when the source has several per zone."""
        return f"{self.name}/{self.instance}" if self.instance else self.name

    @property
    def ticks(self) -> int:
        return len(self.available)

    @property
    def duration_seconds(self) -> float:
        return self.ticks * self.gap_seconds

    def tick_at(self, seconds_since_start: float) -> int:
        """The tick covering that moment; clamped to the trace (the last state holds after the end)."""
        if not self.available:
            raise TraceFormatError(f"{self.name}: empty trace")
        i = int(math.floor(seconds_since_start / self.gap_seconds))
        return min(max(i, 0), self.ticks - 1)

    def available_at(self, seconds_since_start: float) -> bool:
        return self.available[self.tick_at(seconds_since_start)]

    def price_at(self, seconds_since_start: float) -> float | None:
        if self.prices is None:
            return None
        return self.prices[self.tick_at(seconds_since_start)]

    def availability(self, observed_only: bool = True) -> float:
        """Fraction of ticks with spot available (synthetic gap-filled ticks skipped by default)."""
        idx = [i for i in range(self.ticks) if not (observed_only and self.filled and self.filled[i])]
        return sum(self.available[i] for i in idx) / len(idx) if idx else 0.0

    def with_nodes(self, nodes: int) -> ZoneTrace:
        """The same trace for a job that needs ``nodes`` instances at once (count sources only)."""
        if self.capacity is None:
            raise TraceFormatError(f"{self.name}: source {self.source} has no instance counts")
        return replace(self, available=[c >= nodes for c in self.capacity])

    def window(self, start_tick: int, ticks: int | None = None) -> ZoneTrace:
        """A sub-trace starting at ``start_tick`` (for replaying many jobs over one long trace)."""
        end = self.ticks if ticks is None else min(self.ticks, start_tick + ticks)

        def cut(seq: list[Any] | None) -> list[Any] | None:
            return None if seq is None else seq[start_tick:end]

        start = self.start + timedelta(seconds=start_tick * self.gap_seconds) if self.start else None
        return replace(
            self,
            available=self.available[start_tick:end],
            prices=cut(self.prices),
            capacity=cut(self.capacity),
            filled=cut(self.filled),
            start=start,
        )


# --------------------------------------------------------------------------- detection


def _first_line(path: Path) -> str:
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        for line in f:
            if line.strip():
                return line.strip()
    return ""


def detect_format(path: Path) -> str:
    """Name the trace format of a file by looking at its content."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        with path.open() as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or "data" not in doc:
            raise TraceFormatError(f"{path}: JSON without a 'data' series is not a known trace")
        meta = doc.get("metadata") or {}
        # Only SkyNomad's own metadata marks its (inverted) convention: a `prices` key alone does
        # not, since SkyPilot's preemption traces carry prices too and store instance counts.
        if any(k in meta for k in ("zone", "start_time", "gap_filled", "price_info", "source_dir")):
            return "skynomad"
        return "skypilot"
    head = _first_line(path)
    if head.startswith("run_id,scheduled_at,zone"):
        return "skynomad-probes"
    if head.startswith("Timestamp,AvailabilityZone,InstanceType"):
        return "aws-price-history"
    if head.startswith("commit_date,commit,generated,instance_type"):
        return "gcp-price-history"
    cells = [c.strip() for c in head.split(",")]
    if len(cells) == 3 and cells[1] in ("add", "remove"):
        return "bamboo-events"
    if len(cells) == 3 and re.fullmatch(r"\d{4}-\d{2}-\d{2}", cells[0]):
        return "bamboo-gcloud"
    if len(cells) == 3 and cells[0].isdigit() and "T" in cells[1] and cells[2] in ("0", "1"):
        return "skypilot-raw"
    if len(cells) == 2 and all(re.fullmatch(r"-?\d+(\.\d+)?", c) for c in cells):
        return "bamboo-doc"
    raise TraceFormatError(f"{path}: unknown trace format (first line {head[:80]!r})")


# --------------------------------------------------------------------------- loaders


def _parse_zone_stem(stem: str) -> tuple[str, str | None]:
    """``us-west-2a_v100_1`` -> (``us-west-2a``, ``v100_1``); ``us-east4-a_h100_16`` likewise."""
    zone, _, rest = stem.partition("_")
    return zone, (rest or None)


def _load_skypilot(path: Path, nodes: int) -> list[ZoneTrace]:
    doc = json.loads(path.read_text())
    counts = [int(v) for v in doc["data"]]
    gap = float(doc.get("metadata", {}).get("gap_seconds", 600))
    zone, inst = _parse_zone_stem(path.stem)
    raw_prices = doc.get("prices")
    prices = None
    if raw_prices:
        if len(raw_prices) != len(counts):
            raise TraceFormatError(f"{path}: 'prices' has {len(raw_prices)} ticks, 'data' has {len(counts)}")
        prices = [float(p) for p in raw_prices]
    return [
        ZoneTrace(
            name=zone,
            source="skypilot",
            gap_seconds=gap,
            available=[c >= nodes for c in counts],
            prices=prices,
            instance=inst,
            capacity=counts,
            path=str(path),
        )
    ]


def _load_skynomad(path: Path, nodes: int) -> list[ZoneTrace]:
    doc = json.loads(path.read_text())
    meta = doc.get("metadata") or {}
    # Preempted convention: 1 = unavailable.
    avail = [not bool(v) for v in doc["data"]]
    gap = float(meta.get("gap_seconds", 600))
    zone, inst = _parse_zone_stem(path.stem)
    zone = meta.get("zone", zone)
    prices = [float(p) for p in doc["prices"]] if doc.get("prices") else None
    info = meta.get("price_info") or {}
    ondemand = info.get("on_demand_price") if isinstance(info, dict) else None
    filled = [False] * len(avail)
    gf = meta.get("gap_filled") or {}
    if gf:
        for i in range(int(gf["gap_start_index"]), int(gf["gap_end_index"]) + 1):
            if 0 <= i < len(filled):
                filled[i] = True
    start = datetime.fromisoformat(meta["start_time"]) if meta.get("start_time") else None
    return [
        ZoneTrace(
            name=zone,
            source="skynomad",
            gap_seconds=gap,
            available=avail,
            prices=prices,
            ondemand_price=float(ondemand) if ondemand else None,
            start=start,
            instance=inst,
            filled=filled if gf else None,
            path=str(path),
            meta={"machine_type": info.get("machine_type")} if isinstance(info, dict) else {},
        )
    ]


def _parse_ts(text: str) -> datetime:
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _load_skypilot_raw(path: Path, nodes: int) -> list[ZoneTrace]:
    rows = list(csv.reader(path.open(newline="")))
    rows = [r for r in rows if r]
    stamps = [_parse_ts(r[1]) for r in rows]
    # 1 = launch FAILED: spot unavailable.
    avail = [r[2].strip() == "0" for r in rows]
    diffs = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
    gap = float(round(statistics.median(diffs))) if diffs else 600.0
    zone, inst = _parse_zone_stem(path.stem)
    return [
        ZoneTrace(
            name=zone,
            source="skypilot-raw",
            gap_seconds=gap,
            available=avail,
            start=stamps[0],
            instance=inst,
            path=str(path),
        )
    ]


def _load_skynomad_probes(path: Path, nodes: int) -> list[ZoneTrace]:
    by_zone: dict[str, dict[str, tuple[int, float | None]]] = defaultdict(dict)
    runs: set[str] = set()
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            at = row["scheduled_at"]
            runs.add(at)
            price = row.get("gpu_spot_price_usd_per_hour") or ""
            by_zone[row["zone"]][at] = (int(row["instances_created"]), float(price) if price else None)
    order = sorted(runs, key=_parse_ts)
    stamps = [_parse_ts(s) for s in order]
    diffs = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
    gap = float(round(statistics.median(diffs))) if diffs else 600.0
    out = []
    for zone in sorted(by_zone):
        counts = [by_zone[zone].get(at, (0, None))[0] for at in order]
        raw_prices = [by_zone[zone].get(at, (0, None))[1] for at in order]
        out.append(
            ZoneTrace(
                name=zone,
                source="skynomad-probes",
                gap_seconds=gap,
                available=[c >= nodes for c in counts],
                prices=_fill_missing(raw_prices),
                start=stamps[0].astimezone(UTC),
                instance="h100_1",
                capacity=counts,
                path=str(path),
                meta={"price_unit": "per GPU (H100 spot SKU)"},
            )
        )
    return out


def _fill_missing(values: Sequence[float | None]) -> list[float] | None:
    """Forward-fill gaps, back-fill the head from the first known value; None if nothing is known."""
    first = next((v for v in values if v is not None), None)
    if first is None:
        return None
    out, last = [], first
    for v in values:
        last = v if v is not None else last
        out.append(last)
    return out


def _step_series(points: Sequence[tuple[float, int]], gap: float, end: float | None = None) -> list[int]:
    """Sample a step function (time seconds, value) on ticks, keeping each tick's *minimum*.

    The minimum is the conservative reading: a node lost for part of a tick counts as lost.
    """
    pts = sorted(points, key=lambda p: p[0])
    t_end = max(end if end is not None else pts[-1][0], pts[-1][0])
    n = int(math.floor(t_end / gap + 1e-9)) + 1  # the last sample's state gets a tick too
    out: list[int] = []
    j, cur = 0, pts[0][1]
    for i in range(n):
        lo, hi = i * gap, (i + 1) * gap
        while j < len(pts) and pts[j][0] <= lo:
            cur = pts[j][1]
            j += 1
        low = cur
        k = j
        while k < len(pts) and pts[k][0] < hi:
            low = min(low, pts[k][1])
            k += 1
        out.append(low)
    return out


def _load_bamboo_events(path: Path, nodes: int, gap: float = 60.0) -> list[ZoneTrace]:
    alive: set[str] = set()
    points: list[tuple[float, int]] = [(0.0, 0)]
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            t, ev, node = float(row[0]) / 1000.0, row[1].strip(), row[2].strip()
            (alive.add if ev == "add" else alive.discard)(node)
            points.append((t, len(alive)))
    # Collapse same-instant events to their final count (a batch of adds is one step).
    last: dict[float, int] = {}
    for t, c in points:
        last[t] = c
    counts = _step_series(sorted(last.items()), gap)
    return [
        ZoneTrace(
            name=path.stem.replace("-trace", ""),
            source="bamboo-events",
            gap_seconds=gap,
            available=[c >= nodes for c in counts],
            capacity=counts,
            instance=path.stem.split("-")[0],
            path=str(path),
        )
    ]


def _load_bamboo_gcloud(path: Path, nodes: int, gap: float = 60.0) -> list[ZoneTrace]:
    samples: list[tuple[datetime, int]] = []
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if len(row) < 3:
                continue
            dt = datetime.strptime(f"{row[0].strip()} {row[1].strip()}", "%Y-%m-%d %H:%M:%S")
            samples.append((dt, int(row[2])))
    # The file is not strictly time-ordered (the collector restarted); sort, keep order of equal stamps.
    samples.sort(key=lambda s: s[0])
    t0 = samples[0][0]
    counts = _step_series([((dt - t0).total_seconds(), n) for dt, n in samples], gap)
    # a100x1-east1b -> us-east1-b
    inst, _, where = path.stem.partition("-")
    m = re.fullmatch(r"([a-z]+)(\d+)([a-z])", where)
    zone = f"us-{m.group(1)}{m.group(2)}-{m.group(3)}" if m else where
    return [
        ZoneTrace(
            name=zone,
            source="bamboo-gcloud",
            gap_seconds=gap,
            available=[c >= nodes for c in counts],
            capacity=counts,
            instance=inst,
            start=t0,
            path=str(path),
            meta={"timezone": "unknown"},
        )
    ]


def _load_bamboo_doc(path: Path, nodes: int, gap: float = 60.0) -> list[ZoneTrace]:
    rows = [r for r in csv.reader(path.open(newline="")) if len(r) >= 2]
    # x is hours in the "_scaled" files, which print it with decimals (one unsuffixed file does
    # too: it spans 88.7 "units" over three days); integer x is seconds.
    hours = path.stem.endswith("_scaled") or any("." in r[0] for r in rows)
    scale = 3600.0 if hours else 1.0
    pts = [(float(r[0]) * scale, int(float(r[1]))) for r in rows]
    # Rows come in pairs at one x (old value, new value): the later row wins.
    last: dict[float, int] = {}
    for t, c in pts:
        last[t] = c
    counts = _step_series(sorted(last.items()), gap)
    stem = path.stem.removesuffix("_scaled")
    m = re.search(r"(g4dn|p2|p3)-(\w+)-((?:us|eu)-[a-z]+-\d[a-z])", stem)
    zone = m.group(3) if m else stem
    inst = f"{m.group(1)}.{m.group(2)}" if m else None
    return [
        ZoneTrace(
            name=zone,
            source="bamboo-doc",
            gap_seconds=gap,
            available=[c >= nodes for c in counts],
            capacity=counts,
            instance=inst,
            path=str(path),
        )
    ]


def _price_traces(
    events: dict[tuple[str, str], list[tuple[datetime, float]]],
    ondemand: dict[tuple[str, str], float],
    gap: float,
    source: str,
    path: Path,
) -> list[ZoneTrace]:
    """Turn price-change events per (zone, type) into price traces on one common time axis."""
    if not events:
        return []
    t0 = min(ev[0][0] for ev in events.values())
    t1 = max(ev[-1][0] for ev in events.values())
    n = int((t1 - t0).total_seconds() // gap) + 1
    out = []
    for (zone, itype), evs in sorted(events.items()):
        evs.sort(key=lambda e: e[0])
        prices, j, cur = [], 0, evs[0][1]
        for i in range(n):
            t = t0 + timedelta(seconds=i * gap)
            while j < len(evs) and evs[j][0] <= t:
                cur = evs[j][1]
                j += 1
            prices.append(cur)
        out.append(
            ZoneTrace(
                name=zone,
                source=source,
                gap_seconds=gap,
                available=[True] * n,
                prices=prices,
                ondemand_price=ondemand.get((zone, itype)),
                start=t0,
                instance=itype,
                path=str(path),
            )
        )
    return out


def _load_aws_price_history(path: Path, nodes: int, gap: float = 3600.0) -> list[ZoneTrace]:
    events: dict[tuple[str, str], list[tuple[datetime, float]]] = defaultdict(list)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            key = (row["AvailabilityZone"], row["InstanceType"])
            events[key].append((_parse_ts(row["Timestamp"]), float(row["SpotPrice"])))
    return _price_traces(events, {}, gap, "aws-price-history", path)


def _load_gcp_price_history(path: Path, nodes: int, gap: float = 86400.0) -> list[ZoneTrace]:
    events: dict[tuple[str, str], list[tuple[datetime, float]]] = defaultdict(list)
    ondemand: dict[tuple[str, str], float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row["hour_spot_usd"]:
                continue
            key = (row["region"], row["instance_type"])
            at = datetime.fromisoformat(row["commit_date"]).replace(tzinfo=UTC)
            events[key].append((at, float(row["hour_spot_usd"])))
            if row["hour_ondemand_usd"]:
                ondemand[key] = float(row["hour_ondemand_usd"])
    return _price_traces(events, ondemand, gap, "gcp-price-history", path)


_LOADERS = {
    "skypilot": _load_skypilot,
    "skynomad": _load_skynomad,
    "skypilot-raw": _load_skypilot_raw,
    "skynomad-probes": _load_skynomad_probes,
    "bamboo-events": _load_bamboo_events,
    "bamboo-gcloud": _load_bamboo_gcloud,
    "bamboo-doc": _load_bamboo_doc,
    "aws-price-history": _load_aws_price_history,
    "gcp-price-history": _load_gcp_price_history,
}

FORMATS = tuple(_LOADERS)


def load_trace(path: str | Path, *, nodes: int = 1, fmt: str | None = None) -> list[ZoneTrace]:
    """Load every zone a trace file holds.

    ``nodes`` is how many instances the job needs at once: count-valued sources are
    available at a tick only when at least that many instances could be had.
    ``fmt`` forces a format name (see :data:`FORMATS`) instead of detecting it.
    """
    path = Path(path)
    if nodes < 1:
        raise ValueError("nodes must be >= 1")
    if path.is_dir():
        return load_traces([path], nodes=nodes)
    fmt = fmt or detect_format(path)
    if fmt not in _LOADERS:
        raise TraceFormatError(f"unknown trace format {fmt!r}; known: {', '.join(FORMATS)}")
    try:
        traces = _LOADERS[fmt](path, nodes)
    except (KeyError, IndexError, ValueError) as e:
        if isinstance(e, TraceFormatError):
            raise
        raise TraceFormatError(f"{path}: malformed {fmt} trace: {e}") from e
    if not traces or any(not t.available for t in traces):
        raise TraceFormatError(f"{path}: trace has no ticks")
    return traces


def load_traces(paths: Iterable[str | Path], *, nodes: int = 1) -> list[ZoneTrace]:
    """Load several files (a directory means every .json/.csv file in it, sorted)."""
    out: list[ZoneTrace] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".json", ".csv") and f.is_file())
            for f in files:
                out.extend(load_trace(f, nodes=nodes))
        else:
            out.extend(load_trace(p, nodes=nodes))
    return out
