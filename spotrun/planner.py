"""The planner: which offer to run a job on, ranked by *expected total cost*, not sticker price.

Pure functions over a JobSpec and a list of Offers (no I/O, no clock), so the controller can call
`plan` on every launch and relaunch, and tests can check the arithmetic by hand.

Cost model (docs/CATALOG.md explains it with a worked example)::

    T  = remaining work on this offer, hours  = hours_on_one_A100 / (speed(gpu) * scale(count)) * (1 - progress)
                                                (or the spec's hours_on[gpu], scaled the same way)
    c  = hours lost per preemption            = R + L
         R = boot time of the cloud + (data_gb + checkpoint_gb) / transfer rate
         L = checkpoint_gb / transfer rate     if a final save fits in the cloud's notice
           = checkpoint interval / 2           otherwise (on average half an interval is redone)
    W  = expected wall hours                  = T / (1 - rate * c)
         (time lost is itself exposed to preemption; rate * c >= 1 never finishes)
    N  = expected preemptions                 = rate * W
    cost = price * T                          compute
         + price * (W - T)                    restarts: boots, reloads and redone work
         + storage: 2 checkpoints kept in the Store for W hours
         + egress: data in (1 + N times), each checkpoint out (W / interval times), restores (N times)

On-demand has rate 0, so W = T. A spot offer beats a pricier, steadier one exactly when its
`price * W` plus transfer costs is lower.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from operator import attrgetter
from typing import Any

from spotrun.catalog.model import Offer
from spotrun.catalog.transfer import (
    BOOT_SECONDS,
    HOURS_PER_MONTH,
    NOTICE_SECONDS,
    TRANSFER_GB_PER_SECOND,
    egress_usd_per_gb,
    storage_usd_per_gb_month,
)
from spotrun.clouds.images import EXCLUDED as IMAGE_EXCLUDED
from spotrun.clouds.images import exclusion as image_exclusion
from spotrun.gpus import GPU_MODELS, canonical_gpu_name, checkpoint_gb, estimate_memory_gb

DEFAULT_HOURS_ON_A100 = 1.0  # when the spec gives no runtime hint
DEFAULT_CHECKPOINT_INTERVAL_S = 1800.0  # when the spec gives no checkpoint interval
DEFAULT_CHECKPOINT_GB = 1.0  # when neither checkpoint_gb nor model_params is given
CHECKPOINTS_KEPT = 2  # the latest and the one before it, while a new one is being written
NOTICE_SAVE_SHARE = 0.8  # a final save must fit in this share of the notice period
SCALING_PER_DOUBLING = 0.9  # data-parallel efficiency kept per doubling of GPUs in one instance
MEMORY_SLACK = 0.95  # clouds report usable memory: accept 95% of the size asked for
_SCHEME_PROVIDER = {"s3": "aws", "gs": "gcp", "gcs": "gcp", "az": "azure", "file": "local"}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to run the job: an offer, spot or on-demand, with its expected cost and time."""

    offer: Offer
    spot: bool
    hourly_price: float
    expected_hours: float  # expected wall hours on this offer, preemptions included
    expected_preemptions: float
    expected_cost: float  # USD, = sum(breakdown.values())
    breakdown: dict[str, float]  # USD: compute, restarts, storage, egress
    finish_hours: float  # hours since the job started when it is expected to finish
    meets_deadline: bool
    within_budget: bool
    base_hours: float = 0.0  # remaining work on this offer if nothing were preempted
    hours_lost_per_preemption: float = 0.0  # restart + redone work, for one preemption
    final_save_fits: bool = False  # whether a checkpoint can be saved within the notice
    nodes: int = 1  # a gang of this many instances: hourly_price is the gang's, N x one instance's

    @property
    def key(self) -> str:
        return self.offer.key

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.offer.key,
            "offer": self.offer.to_dict(),
            "spot": self.spot,
            "hourly_price": self.hourly_price,
            "expected_hours": self.expected_hours,
            "expected_preemptions": self.expected_preemptions,
            "expected_cost": self.expected_cost,
            "breakdown": dict(self.breakdown),
            "finish_hours": self.finish_hours,
            "meets_deadline": self.meets_deadline,
            "within_budget": self.within_budget,
            "base_hours": self.base_hours,
            "hours_lost_per_preemption": self.hours_lost_per_preemption,
            "final_save_fits": self.final_save_fits,
            "nodes": self.nodes,
        }


@dataclass
class Plan:
    """Ranked candidates (best first) and why the other offers were left out."""

    candidates: list[Candidate]
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> number of offers
    near_misses: list[Candidate] = field(default_factory=list)  # fit, but over budget or past deadline
    ondemand_baseline: Candidate | None = None  # the cheapest on-demand way, for comparison
    notes: list[str] = field(default_factory=list)  # the assumptions behind the estimates
    gpu_memory_needed_gb: float | None = None
    offers_considered: int = 0

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def explain_empty(self) -> str:
        """A one-paragraph answer to "why does nothing fit?" ("" when something does)."""
        if self.candidates:
            return ""
        if not self.offers_considered:
            return "there are no offers to choose from (is the catalog empty? try `spotrun catalog refresh`)"
        parts = [f"{n} {reason}" for reason, n in sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0]))]
        text = f"none of {self.offers_considered} offers fits: " + "; ".join(parts)
        if self.near_misses:
            near = self.near_misses[0]
            text += (
                f". Closest: {near.offer.key} ({'spot' if near.spot else 'on-demand'}), expected "
                f"${near.expected_cost:,.2f} and {near.finish_hours:.1f} h"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidates": [c.to_dict() for c in self.candidates],
            "rejected": dict(self.rejected),
            "near_misses": [c.to_dict() for c in self.near_misses],
            "ondemand_baseline": self.ondemand_baseline.to_dict() if self.ondemand_baseline else None,
            "notes": list(self.notes),
            "gpu_memory_needed_gb": self.gpu_memory_needed_gb,
            "offers_considered": self.offers_considered,
        }


# --------------------------------------------------------------------------- reading the spec


def _get(obj: Any, name: str, default: Any = None) -> Any:
    value = getattr(obj, name, None) if obj is not None else None
    return default if value is None else value


@dataclass(frozen=True)
class _Job:
    """The parts of a JobSpec the planner uses, normalized once per plan."""

    gpu_names: frozenset[str] | None  # None: any model
    gpu_count: int  # 0: the job needs no GPU
    gpu_memory_gb: float | None  # per GPU, asked for or estimated
    cpus: float
    memory_gb: float
    providers: frozenset[str]
    regions: tuple[str, ...]
    zones: tuple[str, ...]
    spot_modes: tuple[bool, ...]
    max_price: float | None
    interval_h: float
    checkpoint_gb: float
    data_gb: float
    hours_one_a100: float
    hours_on: dict[str, float]  # canonical GPU -> hours on one such GPU
    budget: float | None
    deadline_h: float | None
    store: tuple[str, str | None] | None  # (provider, region) of the Store, None: next to the instance
    data_source: tuple[str, str | None] | None  # where the input data is pulled from
    own_images: frozenset[str] = frozenset()  # clouds whose boot image the spec names (its driver too)
    nodes: int = 1  # instances run as one gang: N x the price, N x the interruption rate


def _gpu_names(name: Any) -> frozenset[str] | None:
    if not name or str(name).lower() in ("any", "*"):
        return None
    raw = name if isinstance(name, list | tuple | set | frozenset) else str(name).replace("|", ",").split(",")
    return frozenset(canonical_gpu_name(str(x).strip()) or str(x).strip() for x in raw)


def _location(url: str | None) -> tuple[str, str | None] | None:
    """(provider, region) of a Store or data URL; region is unknown from a bucket URL alone."""
    if not url:
        return None
    text = str(url)
    scheme = text.split("://", 1)[0].lower() if "://" in text else "file"
    provider = _SCHEME_PROVIDER.get(scheme)
    return (provider, None) if provider else None


def _job(spec: Any, notes: list[str]) -> _Job:
    res = _get(spec, "resources")
    request = _get(res, "gpu")
    count = int(_get(request, "count", 1)) if request is not None else 0
    workload = _get(spec, "workload")
    params = _get(workload, "model_params")
    params = float(params) if params is not None else None
    precision = str(_get(workload, "precision", "bf16"))
    optimizer = str(_get(workload, "optimizer", "adamw"))

    memory = _get(request, "memory")
    if memory is None and params and count:
        memory = estimate_memory_gb(params, precision=precision, optimizer=optimizer, gpus=count)
        notes.append(
            f"GPU memory needed: ~{memory:.1f} GB per GPU for {params / 1e9:g}B parameters "
            f"({precision}, {optimizer}, states sharded over {count} GPU(s), +20% for activations)"
        )

    ckpt = _get(workload, "checkpoint_gb")
    if ckpt is None and params:
        ckpt = checkpoint_gb(params, precision=precision, optimizer=optimizer)
        notes.append(f"checkpoint size: ~{ckpt:.1f} GB (weights + optimizer state)")
    if ckpt is None:
        ckpt = DEFAULT_CHECKPOINT_GB
        notes.append(f"checkpoint size unknown: assumed {DEFAULT_CHECKPOINT_GB:g} GB")

    interval = _get(_get(spec, "checkpoint"), "interval")
    if interval is None:
        interval = DEFAULT_CHECKPOINT_INTERVAL_S
        notes.append(f"no checkpoint interval: assumed {DEFAULT_CHECKPOINT_INTERVAL_S / 60:g} min")

    hours_on = {canonical_gpu_name(str(g)) or str(g): float(h) for g, h in dict(_get(workload, "hours_on", {})).items()}
    hours = _get(workload, "hours")
    if hours is None:
        for gpu, h in hours_on.items():  # an A100-equivalent from any GPU whose speed is known
            if gpu in GPU_MODELS:
                hours = h * GPU_MODELS[gpu].speed
                break
    if hours is None:
        hours = DEFAULT_HOURS_ON_A100
        notes.append(f"no runtime hint (workload.hours / hours_on): assumed {hours:g} h on one A100")
    if count > 1:
        notes.append(
            f"runtime on {count} GPUs = one GPU's / ({count} x {_scale(count) / count:.0%} scaling efficiency)"
        )

    spot = _get(res, "spot", True)
    spot_modes = (True, False) if spot == "auto" else ((True,) if spot else (False,))
    deadline = _get(spec, "deadline")
    store = _location(_get(spec, "store"))
    data_urls = [u for u in dict(_get(spec, "data", {})) if "://" in str(u) and not str(u).startswith("file:")]
    data_source = _location(data_urls[0]) if data_urls else store
    if store is None:
        notes.append("no store given: checkpoints assumed kept next to the instance (no egress)")
    elif store[0] != "local":
        notes.append(f"store on {store[0]}: its region is unknown, so same-cloud moves are counted as free")
    return _Job(
        gpu_names=_gpu_names(_get(request, "name")) if request is not None else None,
        gpu_count=count,
        gpu_memory_gb=float(memory) if memory is not None else None,
        cpus=float(_get(res, "cpus", 0)),
        memory_gb=float(_get(res, "memory", 0)),
        providers=frozenset(_get(res, "providers", ()) or ()),
        regions=tuple(_get(res, "regions", ()) or ()),
        zones=tuple(_get(res, "zones", ()) or ()),
        spot_modes=spot_modes,
        max_price=_get(res, "max_price"),
        interval_h=float(interval) / 3600.0,
        checkpoint_gb=float(ckpt),
        data_gb=float(_get(workload, "data_gb", 0.0)),
        hours_one_a100=float(hours),
        hours_on=hours_on,
        budget=_get(spec, "budget"),
        deadline_h=float(deadline) / 3600.0 if deadline is not None else None,
        store=store,
        data_source=data_source,
        own_images=_own_images(spec),
        nodes=_nodes(_get(spec, "resources"), notes),
    )


def _own_images(spec: Any) -> frozenset[str]:
    """Clouds whose spec section names a boot image: the image table (clouds/images.py) does not
    judge their GPUs' drivers, the user's image does."""
    keys = {"aws": "ami", "gcp": "image", "azure": "image"}
    return frozenset(cloud for cloud, key in keys.items() if _get(_get(spec, cloud), key))


def _nodes(res: Any, notes: list[str]) -> int:
    nodes = int(_get(res, "nodes", 1) or 1)
    if nodes > 1:
        notes.append(
            f"{nodes} nodes as one gang in one zone: {nodes} x the instance price, {nodes} x its interruption "
            f"rate (a preemption of any node restarts the gang), runtime / ({nodes} x "
            f"{_scale(nodes) / nodes:.0%} scaling efficiency)"
        )
    return nodes


def _scale(count: int) -> float:
    """Throughput of `count` GPUs in one instance, in single GPUs (90% kept per doubling)."""
    return count * SCALING_PER_DOUBLING ** math.log2(count) if count > 1 else 1.0


# --------------------------------------------------------------------------- filters


def _misfit(job: _Job, offer: Offer) -> str | None:
    """Why `offer` cannot run the job (a short reason), or None if it can, price aside."""
    if job.providers and offer.provider not in job.providers:
        return "provider not allowed"
    if job.regions and not any(fnmatchcase(offer.region, g) for g in job.regions):
        return "region not allowed"
    if job.zones and not any(fnmatchcase(offer.zone, g) for g in job.zones):
        return "zone not allowed" if offer.zone else "zone not allowed (no zone in offer)"
    if job.gpu_count:
        if offer.gpu is None or (job.gpu_names is not None and offer.gpu not in job.gpu_names):
            return "other GPU model"
        if offer.gpu_count != job.gpu_count:
            return "other GPU count"
        if job.gpu_memory_gb is not None and offer.gpu_memory_gb < job.gpu_memory_gb * MEMORY_SLACK:
            return "too little GPU memory"
    if offer.provider not in job.own_images and image_exclusion(offer) is not None:
        return IMAGE_EXCLUDED  # e.g. a K80 no current driver image supports (docs/providers); the
        # provider would refuse to boot it too, so a CPU-only job skips it as well
    if offer.vcpus < job.cpus:
        return "too few vCPUs"
    if offer.memory_gb < job.memory_gb:
        return "too little RAM"
    return None


# --------------------------------------------------------------------------- cost


class _Costing:
    """Expected hours and cost of one job on any offer; memoizes what depends only on the cloud."""

    def __init__(self, job: _Job, elapsed_h: float, progress: float, spent: float) -> None:
        self.job = job
        self.elapsed_h = elapsed_h
        self.remaining = max(0.0, 1.0 - progress)
        self.spent = spent
        self._per_provider: dict[str, tuple[float, bool]] = {}
        self._per_place: dict[tuple[str, str], tuple[float, float, float, float]] = {}

    def base_hours(self, offer: Offer) -> float:
        job = self.job
        if not job.gpu_count or offer.gpu is None:
            return job.hours_one_a100 / _scale(job.nodes) * self.remaining
        one = job.hours_on.get(offer.gpu)
        if one is None:
            model = GPU_MODELS.get(offer.gpu)
            one = job.hours_one_a100 / (model.speed if model else 1.0)
        return one / _scale(offer.gpu_count * job.nodes) * self.remaining

    def preemption(self, provider: str) -> tuple[float, bool]:
        """(hours lost per preemption, whether a final save fits in the notice) on `provider`."""
        hit = self._per_provider.get(provider)
        if hit is None:
            job = self.job
            per_gb_h = 1.0 / (TRANSFER_GB_PER_SECOND * 3600.0)
            save_h = job.checkpoint_gb * per_gb_h
            fits = save_h <= NOTICE_SECONDS.get(provider, 30.0) / 3600.0 * NOTICE_SAVE_SHARE
            lost = save_h if fits else job.interval_h / 2.0
            restart = BOOT_SECONDS.get(provider, 180.0) / 3600.0 + (job.data_gb + job.checkpoint_gb) * per_gb_h
            hit = self._per_provider[provider] = (restart + lost, fits)
        return hit

    def transfer_rates(self, offer: Offer) -> tuple[float, float, float, float]:
        """USD/GB for data in, checkpoints out, checkpoints back in; storage USD/GB-hour."""
        place = (offer.provider, offer.region)
        hit = self._per_place.get(place)
        if hit is None:
            job = self.job
            store = job.store or place
            data = job.data_source or store
            data_in = egress_usd_per_gb(data[0], data[1], offer.provider, offer.region)
            out = egress_usd_per_gb(offer.provider, offer.region, store[0], store[1])
            back = egress_usd_per_gb(store[0], store[1], offer.provider, offer.region)
            storage = storage_usd_per_gb_month(store[0]) / HOURS_PER_MONTH
            hit = self._per_place[place] = (data_in, out, back, storage)
        return hit

    def candidate(self, offer: Offer, spot: bool, price: float) -> Candidate | None:
        """None when preemptions come so often that the job would never finish."""
        job = self.job
        base = self.base_hours(offer)
        rate = (offer.interruption_rate if spot else 0.0) * job.nodes  # any node's preemption stops the gang
        price *= job.nodes  # the gang's hourly price
        per_preemption, fits = self.preemption(offer.provider)
        if rate * per_preemption >= 1.0:
            return None
        wall = base / (1.0 - rate * per_preemption)
        preemptions = rate * wall
        data_in, out, back, storage_gb_h = self.transfer_rates(offer)
        saves = wall / job.interval_h if job.interval_h > 0 else 0.0
        egress = (
            job.data_gb * (1.0 + preemptions) * data_in
            + job.checkpoint_gb * saves * out
            + job.checkpoint_gb * preemptions * back
        )
        storage = CHECKPOINTS_KEPT * job.checkpoint_gb * storage_gb_h * wall
        compute = price * base
        restarts = price * (wall - base)
        cost = compute + restarts + storage + egress
        finish = self.elapsed_h + wall
        return Candidate(
            offer,
            spot,
            price,
            wall,
            preemptions,
            cost,
            {"compute": compute, "restarts": restarts, "storage": storage, "egress": egress},
            finish,
            job.deadline_h is None or finish <= job.deadline_h,
            job.budget is None or self.spent + cost <= job.budget,
            base,
            per_preemption,
            fits,
            job.nodes,
        )


# Rank by expected cost, then expected hours, then hourly price; the sort is stable, so full ties
# keep the order of the offers given (deterministic for a given catalog).
_rank_key = attrgetter("expected_cost", "expected_hours", "hourly_price")


# The reason an offer is counted under when neither its spot nor its on-demand way works: the one
# that tells the user most about what to change.
_REASON_ORDER = ("over budget", "misses deadline", "too volatile to finish", "above max price")


def _main_reason(reasons: list[str]) -> str:
    for reason in _REASON_ORDER:
        if reason in reasons:
            return reason
    return " and ".join(sorted(set(reasons))) or "no price"


def plan(
    spec: Any,
    offers: Iterable[Offer],
    *,
    exclude: Collection[str] = (),
    elapsed_hours: float = 0.0,
    progress: float = 0.0,
    spent: float = 0.0,
) -> Plan:
    """Rank every (offer, spot or on-demand) way to run `spec` by expected total cost, best first.

    `exclude` holds Offer.keys in cooldown; `progress` is the share of the work already done,
    `spent` the USD already spent and `elapsed_hours` the time since the job started, so a re-plan
    after a preemption sees the remaining work, budget and deadline. Candidates all fit the spec,
    its budget and its deadline; `near_misses` holds the best of those that fit but miss one of the
    last two, `rejected` counts every other offer by reason.
    """
    notes: list[str] = []
    job = _job(spec, notes)
    costing = _Costing(job, elapsed_hours, progress, spent)
    excluded = frozenset(exclude)
    rejected: Counter[str] = Counter()
    fits: list[Candidate] = []
    misses: list[Candidate] = []
    baseline: Candidate | None = None
    considered = 0
    for offer in offers:
        considered += 1
        if excluded and offer.key in excluded:
            rejected["in cooldown"] += 1
            continue
        reason = _misfit(job, offer)
        if reason:
            rejected[reason] += 1
            continue
        reasons: list[str] = []
        fitted = False
        ondemand: Candidate | None = None
        for spot in job.spot_modes:
            price = offer.spot_price if spot else offer.ondemand_price
            if price is None or price != price:  # None or NaN
                reasons.append("no spot price" if spot else "no on-demand price")
                continue
            if job.max_price is not None and price > job.max_price:
                reasons.append("above max price")
                continue
            cand = costing.candidate(offer, spot, price)
            if cand is None:
                reasons.append("too volatile to finish")
                continue
            if not spot:
                ondemand = cand
            if cand.meets_deadline and cand.within_budget:
                fits.append(cand)
                fitted = True
            else:
                misses.append(cand)
                reasons.append("misses deadline" if not cand.meets_deadline else "over budget")
        if not fitted:
            rejected[_main_reason(reasons)] += 1
        # The on-demand baseline ignores max_price and spot mode: it answers "what would this
        # cost without spot?" for `spotrun plan` and `status`.
        if ondemand is None and offer.ondemand_price is not None:
            ondemand = costing.candidate(offer, False, offer.ondemand_price)
        if ondemand is not None and (baseline is None or ondemand.expected_cost < baseline.expected_cost):
            baseline = ondemand
    fits.sort(key=_rank_key)
    misses.sort(key=_rank_key)
    if elapsed_hours or progress or spent:
        notes.append(f"re-plan: {progress:.0%} done, {elapsed_hours:.2f} h elapsed, ${spent:,.2f} spent")
    return Plan(
        candidates=fits,
        rejected=dict(rejected),
        near_misses=misses[:10],
        ondemand_baseline=baseline,
        notes=notes,
        gpu_memory_needed_gb=job.gpu_memory_gb,
        offers_considered=considered,
    )
