"""Expected spot preemptions per hour: from AWS Spot Advisor buckets and from availability traces.

docs/CATALOG.md walks through these conversions with the numbers. In short:

* **Traces** (GCP H100 from SkyNomad, GCP A100/V100 and AWS V100/K80 from Bamboo and the SkyPilot
  "Can't Be Late" probes): a spot VM running in a zone is taken back roughly when the zone's spot
  capacity disappears, so the rate is the number of *available -> unavailable* transitions divided
  by the hours the zone was available. For a cluster trace (instances alive over time) it is the
  number of instances removed divided by the instance-hours.
* **AWS Spot Advisor buckets** ("<5%", "5-10%", "10-15%", "15-20%", ">20%") give the share of
  instances of a type that AWS interrupted over the trailing month. Read literally as a constant
  hazard over a 730-hour month (f = 1 - exp(-730 * rate)), the top bucket would mean one preemption
  per ~2,500 hours, while the AWS probe traces of the very same ">20%" types (p3 V100, p2 K80 in
  us-west-2) measure 0.27 per hour: instances do not live a month, so the share is over much shorter
  lifetimes. We therefore keep the bucket's *shape* (rate proportional to -ln(1 - f), f the bucket's
  midpoint, 25% for ">20%") and calibrate its *scale* so the ">20%" bucket equals the measured AWS
  rate. The literal per-month reading is kept as `advisor_bucket_rate_monthly` for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

HOURS_PER_MONTH = 730.0

# Share of instances interrupted that each Spot Advisor bucket stands for (its midpoint; the open
# ">20%" bucket is taken as 25%).
ADVISOR_BUCKET_SHARE: tuple[float, ...] = (0.025, 0.075, 0.125, 0.175, 0.25)
ADVISOR_BUCKET_LABELS: tuple[str, ...] = ("<5%", "5-10%", "10-15%", "15-20%", ">20%")

# Measured rate of AWS spot types the Advisor puts in ">20%": all 12 one-GPU probe files of
# skypilot_spot_strategy_raw (p3.2xlarge and p2.xlarge, us-west-2a/b, 2022-10-26 .. 2023-01-05):
# 1,138 available->unavailable transitions over 4,200 available hours. scripts/build_catalog.py
# recomputes it from the data and fails if this constant drifts.
AWS_TOP_BUCKET_RATE = 1138 / 4200.0  # 0.271 per hour

# Prior for GPU spot VMs with no measurement of their own (any cloud, any GPU), per hour. Pooling every
# trace we have gives 2,597 preemptions over 11,025 exposed hours = 0.236 (AWS V100/K80 probes 0.271,
# GCP H100 0.229, GCP A100 0.099, GCP V100 0.281); rounded to 0.2. Stated, not measured.
GENERIC_PRIOR_RATE = 0.2


def advisor_bucket_rate(bucket: int) -> float:
    """Preemptions per hour for Spot Advisor bucket `bucket` (0..4), calibrated on AWS traces."""
    share = ADVISOR_BUCKET_SHARE[max(0, min(bucket, len(ADVISOR_BUCKET_SHARE) - 1))]
    return AWS_TOP_BUCKET_RATE * math.log1p(-share) / math.log1p(-ADVISOR_BUCKET_SHARE[-1])


def advisor_bucket_rate_monthly(bucket: int) -> float:
    """The literal reading: `share` of instances interrupted within a 730-hour month."""
    share = ADVISOR_BUCKET_SHARE[max(0, min(bucket, len(ADVISOR_BUCKET_SHARE) - 1))]
    return -math.log1p(-share) / HOURS_PER_MONTH


def availability_trace_stats(
    unavailable: Sequence[int | bool], gap_seconds: float, skip: Iterable[int] = ()
) -> tuple[int, float, float]:
    """(transitions, available hours, availability) of a 0/1 trace in the *preempted* convention.

    `unavailable[i]` is truthy when spot capacity was missing at tick i. Ticks in `skip` (synthetic
    gap filling) are left out and break the sequence, so no transition is counted across them.
    """
    skipped = set(skip)
    transitions = 0
    up_ticks = 0
    seen = 0
    prev: bool | None = None
    for i, value in enumerate(unavailable):
        if i in skipped:
            prev = None
            continue
        down = bool(value)
        seen += 1
        if not down:
            up_ticks += 1
        elif prev is False:
            transitions += 1
        prev = down
    hours_up = up_ticks * gap_seconds / 3600.0
    return transitions, hours_up, (up_ticks / seen if seen else 0.0)


def rate_from_counts(transitions: int, hours_up: float) -> float | None:
    """Transitions per available hour; a trace with no transition counts half of one, so a zone
    that never failed while observed is "rare", not "never". None when the zone was never up."""
    if hours_up <= 0:
        return None
    return max(transitions, 0.5) / hours_up


def cluster_removal_rate(samples: Sequence[tuple[float, int]]) -> tuple[int, float]:
    """(instances removed, instance-hours) of a cluster-size series [(epoch seconds, alive), ...].

    Decreases between consecutive samples count as removals; adds and removals inside one sampling
    interval cancel, so this slightly undercounts.
    """
    removed = 0
    inst_hours = 0.0
    for (t0, n0), (t1, n1) in zip(samples, samples[1:], strict=False):
        inst_hours += n0 * (t1 - t0) / 3600.0
        if n1 < n0:
            removed += n0 - n1
    return removed, inst_hours
