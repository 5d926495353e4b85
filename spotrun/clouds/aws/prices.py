"""AWS prices for `spotrun catalog refresh`: DescribeSpotPriceHistory in each region (the price in
effect now, per availability zone) and the Spot Advisor feed (savings and interruption bucket per
region and type). On-demand prices stay those of the bundled snapshot (the Pricing API is a
separate, heavy service). `AWS_ENDPOINT_URL` (boto3's own) and `SPOTRUN_SPOT_ADVISOR_URL` point it
at fakes; `SPOTRUN_AWS_REGIONS` (comma list) limits the regions queried. A failed region keeps its
previous rows while the other regions are updated.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from spotrun.catalog.http import RefreshError, _safe_url, get_json
from spotrun.catalog.interruption import advisor_bucket_rate
from spotrun.catalog.model import Offer

SPOT_ADVISOR_URL = "https://spot-bid-advisor.s3.amazonaws.com/spot-advisor-data.json"


def aws_advisor(url: str) -> dict[tuple[str, str], tuple[float, int]]:
    """(region, instance type) -> (savings %, interruption bucket) from the Spot Advisor feed."""
    doc = get_json(url)
    out = {}
    try:
        for region, oses in doc["spot_advisor"].items():
            for itype, entry in oses.get("Linux", {}).items():
                out[(region, itype)] = (float(entry["s"]), int(entry["r"]))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise RefreshError(f"unexpected Spot Advisor feed shape at {_safe_url(url)}: {e}") from None
    return out


def _aws_region_prices(region: str, types: list[str]) -> dict[tuple[str, str], float]:
    """(zone, type) -> current Linux spot price, from DescribeSpotPriceHistory."""
    import boto3

    ec2 = boto3.client("ec2", region_name=region)
    now = dt.datetime.now(dt.UTC)
    latest: dict[tuple[str, str], tuple[Any, float]] = {}
    paginator = ec2.get_paginator("describe_spot_price_history")
    for page in paginator.paginate(InstanceTypes=types, ProductDescriptions=["Linux/UNIX"], StartTime=now):
        for h in page.get("SpotPriceHistory", []):
            if not str(h.get("ProductDescription", "")).startswith("Linux/UNIX"):
                continue
            key = (h["AvailabilityZone"], h["InstanceType"])
            stamp = h.get("Timestamp")
            if key not in latest or (stamp is not None and stamp > latest[key][0]):
                latest[key] = (stamp, float(h["SpotPrice"]))
    return {k: v for k, (_, v) in latest.items()}


def refresh_aws(
    base: list[Offer], previous: list[Offer], *, regions: Iterable[str] | None, advisor_url: str, today: str
) -> tuple[list[Offer], list[str], list[str]]:
    """(rows, errors, warnings). Raises RefreshError when nothing at all could be fetched."""
    errors: list[str] = []
    warnings: list[str] = []
    try:
        advisor = aws_advisor(advisor_url)
    except RefreshError as e:
        advisor = {}
        warnings.append(f"Spot Advisor: {e}; interruption rates kept as they were")
    by_region: dict[str, list[Offer]] = defaultdict(list)
    for o in base:
        by_region[o.region].append(o)
    wanted = sorted(by_region) if regions is None else [r for r in regions if r in by_region]
    rows: list[Offer] = []
    fetched = 0
    for region in wanted:
        shapes = {o.instance_type: o for o in by_region[region]}
        try:
            prices = _aws_region_prices(region, sorted(shapes))
        except Exception as e:  # botocore raises many types; all mean "this region failed"
            if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
                raise RefreshError("AWS: no credentials (configure them as for the AWS CLI)") from None
            code = getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__)
            errors.append(f"{region}: {code}; kept its previous rows")
            rows.extend(o for o in previous if o.region == region)
            continue
        fetched += 1
        for itype, shape in sorted(shapes.items()):
            saving_bucket = advisor.get((region, itype))
            rate, source = shape.interruption_rate, shape.interruption_source
            if saving_bucket is not None:
                rate, source = round(advisor_bucket_rate(saving_bucket[1]), 5), f"measured:aws-spot-advisor-{today}"
            zones = sorted((z, p) for (z, t), p in prices.items() if t == itype)
            if zones:
                od = shape.ondemand_price
                for zone, price in zones:
                    spot = min(price, od) if od else price
                    rows.append(
                        replace(
                            shape, zone=zone, spot_price=spot, interruption_rate=rate,
                            interruption_source=source, observed=today,
                        )
                    )  # fmt: skip
            elif saving_bucket is not None and shape.ondemand_price:
                spot = round(min(shape.ondemand_price, shape.ondemand_price * (1 - saving_bucket[0] / 100.0)), 5)
                rows.append(
                    replace(shape, spot_price=spot, interruption_rate=rate, interruption_source=source, observed=today)
                )
            else:
                rows.append(shape)
    if wanted and not fetched:
        raise RefreshError("AWS: every region failed: " + "; ".join(errors))
    return rows, errors, warnings


def refresh_offers(
    base: list[Offer], previous: list[Offer], env: Mapping[str, str], today: str
) -> tuple[list[Offer], list[str], list[str]]:
    """The catalog driver's entry point: (rows, errors, warnings)."""
    regions = [r.strip() for r in env.get("SPOTRUN_AWS_REGIONS", "").split(",") if r.strip()] or None
    advisor_url = env.get("SPOTRUN_SPOT_ADVISOR_URL", SPOT_ADVISOR_URL)
    return refresh_aws(base, previous, regions=regions, advisor_url=advisor_url, today=today)
