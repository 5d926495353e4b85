"""The job and market models the simulator replays.

:class:`JobModel` is what a job costs to run and to interrupt: work hours, deadline, the
restart overhead every launch pays (provisioning + restore, billed), how much work a
preemption loses (nothing when the notice-time save works, else the work since the last
periodic checkpoint), and the egress of moving its checkpoint to another region.

:class:`Market` is a set of zone traces on one tick grid: per zone and tick, whether spot
can be had and at what price, plus each zone's on-demand price. Traces are aligned on their
first tick; a trace shorter than the market keeps its last state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from spotrun.policies.observe import ZoneFacts
from spotrun.simulate.traces import ZoneTrace, region_of

# When a trace has no price and the caller gives none: spot at 30% of on-demand, the
# typical GPU discount in the AWS Spot Advisor feed (shared/data/aws_spot_advisor).
DEFAULT_SPOT_FRACTION = 0.3


@dataclass(frozen=True)
class JobModel:
    """One job: what it needs, by when, and what interruptions cost it.

    ``checkpoint_interval_h`` is hours of progress between periodic checkpoints (None: only
    at graceful stops and notices). With ``notice_save`` the save on the preemption notice
    succeeds and a preemption loses nothing; without it, the work since the last checkpoint
    is lost.
    """

    work_h: float
    deadline_h: float | None = None
    restart_overhead_h: float = 0.2
    checkpoint_interval_h: float | None = 0.5
    notice_save: bool = True
    checkpoint_gb: float = 0.0
    egress_usd_per_gb: float = 0.02
    failed_launch_h: float = 0.01  # a spot launch that finds no capacity answers in about half a minute

    def __post_init__(self) -> None:
        if self.work_h <= 0:
            raise ValueError("work_h must be > 0")
        if self.restart_overhead_h < 0:
            raise ValueError("restart_overhead_h must be >= 0")
        if self.deadline_h is not None and self.deadline_h <= 0:
            raise ValueError("deadline_h must be > 0")
        if self.checkpoint_interval_h is not None and self.checkpoint_interval_h <= 0:
            raise ValueError("checkpoint_interval_h must be > 0")
        if self.failed_launch_h < 0:
            raise ValueError("failed_launch_h must be >= 0")

    @property
    def expected_loss_h(self) -> float:
        """Work a preemption loses on average."""
        if self.notice_save:
            return 0.0
        if self.checkpoint_interval_h is None:
            return self.work_h / 2
        return self.checkpoint_interval_h / 2

    @property
    def move_cost_usd(self) -> float:
        """Egress of moving the checkpoint to another region."""
        return self.checkpoint_gb * self.egress_usd_per_gb


@dataclass
class Market:
    """Zones on a common tick grid (``gap_h`` hours per tick), ``ticks`` long."""

    zones: list[str]
    regions: list[str]
    gap_h: float
    available: list[list[bool]]  # [zone][tick]
    spot_price: list[list[float]]  # [zone][tick]
    ondemand_price: list[float]  # [zone]
    ticks: int
    # Published interruption rates (preemptions per hour, e.g. the AWS Spot Advisor bucket) per
    # zone; None: none published. Never measured on the trace being replayed.
    published_rate: list[float | None] | None = None

    @classmethod
    def from_traces(
        cls,
        traces: Sequence[ZoneTrace],
        *,
        spot_price: float | None = None,
        ondemand_price: float | None = None,
        gap_seconds: float | None = None,
        start_tick: int = 0,
        ticks: int | None = None,
        scale: float = 1.0,
    ) -> Market:
        """Resample traces onto one grid (the finest gap among them by default).

        Prices: the trace's own where it has them, else ``spot_price``/``ondemand_price``;
        with only one of the two known, the other follows :data:`DEFAULT_SPOT_FRACTION`.
        All prices are per instance; ``scale`` multiplies them (a job needing N instances).
        """
        if not traces:
            raise ValueError("no zone traces given")
        gap = gap_seconds or min(t.gap_seconds for t in traces)
        total = max(int(math.ceil(t.duration_seconds / gap)) for t in traces)
        n = ticks if ticks is not None else max(1, total - start_tick)
        names = [t.name for t in traces]
        keys = names if len(set(names)) == len(names) else [t.key for t in traces]
        avail, prices, od = [], [], []
        for tr in traces:
            series_a, series_p = [], []
            for i in range(start_tick, start_tick + n):
                s = i * gap
                series_a.append(tr.available_at(s))
                series_p.append(tr.price_at(s) if tr.prices is not None else None)
            zone_od = tr.ondemand_price or ondemand_price
            fallback_spot = spot_price
            if fallback_spot is None and zone_od is not None:
                fallback_spot = zone_od * DEFAULT_SPOT_FRACTION
            if zone_od is None:
                known = [p for p in series_p if p is not None] or ([fallback_spot] if fallback_spot else [])
                if not known:
                    raise ValueError(f"zone {tr.name}: no price in the trace; give a spot or on-demand price")
                zone_od = max(known) / DEFAULT_SPOT_FRACTION
                fallback_spot = fallback_spot or zone_od * DEFAULT_SPOT_FRACTION
            avail.append(series_a)
            prices.append([scale * (p if p is not None else float(fallback_spot)) for p in series_p])
            od.append(scale * float(zone_od))
        return cls(
            zones=keys,
            regions=[region_of(t.name) for t in traces],
            gap_h=gap / 3600.0,
            available=avail,
            spot_price=prices,
            ondemand_price=od,
            ticks=n,
        )

    @classmethod
    def simple(
        cls,
        pattern: dict[str, str],
        *,
        spot: float | dict[str, float] = 1.0,
        ondemand: float | dict[str, float] = 3.0,
        gap_h: float = 1.0,
        regions: dict[str, str] | None = None,
    ) -> Market:
        """A hand-made market: ``{"us-east-1a": "1101"}`` (1 = spot capacity at that tick)."""
        zones = list(pattern)
        n = max(len(p) for p in pattern.values())

        def per_zone(v: float | dict[str, float], z: str) -> float:
            return v[z] if isinstance(v, dict) else v

        avail = [[c == "1" for c in pattern[z].ljust(n, pattern[z][-1])] for z in zones]
        return cls(
            zones=zones,
            regions=[(regions or {}).get(z, region_of(z)) for z in zones],
            gap_h=gap_h,
            available=avail,
            spot_price=[[per_zone(spot, z)] * n for z in zones],
            ondemand_price=[per_zone(ondemand, z) for z in zones],
            ticks=n,
        )

    def window(self, start_tick: int, ticks: int) -> Market:
        """The market seen by a job starting at ``start_tick`` (last state held past the end)."""
        last = self.ticks - 1

        def cut(series: list) -> list:
            return [series[min(i, last)] for i in range(start_tick, start_tick + ticks)]

        return Market(
            zones=list(self.zones),
            regions=list(self.regions),
            gap_h=self.gap_h,
            available=[cut(a) for a in self.available],
            spot_price=[cut(p) for p in self.spot_price],
            ondemand_price=list(self.ondemand_price),
            ticks=ticks,
        )

    def avail(self, z: int, t: int) -> bool:
        return self.available[z][min(t, self.ticks - 1)]

    def price(self, z: int, t: int) -> float:
        return self.spot_price[z][min(t, self.ticks - 1)]

    @cached_property
    def cheapest_ondemand(self) -> int:
        return min(range(len(self.zones)), key=lambda z: self.ondemand_price[z])

    def ondemand_reference(self, job: JobModel) -> float:
        """Cost of the job on on-demand alone: one launch, then the work, at the cheapest zone."""
        return self.ondemand_price[self.cheapest_ondemand] * (job.work_h + job.restart_overhead_h)

    def index(self, key: str) -> int:
        return self._index[key]

    @cached_property
    def _index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.zones)}

    def facts(self, t: int) -> list[ZoneFacts]:
        """What the catalog can say about each zone at tick ``t``: prices and published rates,
        nothing about capacity (cached: shared by every policy run)."""
        t = min(t, self.ticks - 1)
        v = self._facts.get(t)
        if v is None:
            rates = self.published_rate or [None] * len(self.zones)
            v = [
                ZoneFacts(
                    key=k,
                    region=self.regions[z],
                    spot_price=self.spot_price[z][t],
                    ondemand_price=self.ondemand_price[z],
                    published_rate=rates[z],
                )
                for z, k in enumerate(self.zones)
            ]
            self._facts[t] = v
        return v

    @cached_property
    def _facts(self) -> dict[int, list[ZoneFacts]]:
        return {}

    def availability(self) -> list[float]:
        return [sum(a) / len(a) for a in self.available]
