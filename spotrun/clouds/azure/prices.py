"""Azure prices for `spotrun catalog refresh`: the Retail Prices API (no credentials; pages linked by
`NextPageLink`), Linux spot and pay-as-you-go meters of the GPU sizes spotrun knows.
`SPOTRUN_AZURE_PRICES_URL` points it at a fake.
"""

from __future__ import annotations

import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace

from spotrun.catalog.http import MAX_PAGES, RefreshError, _safe_url, get_json
from spotrun.catalog.model import Offer

AZURE_PRICES_URL = "https://prices.azure.com/api/retail/prices"
AZURE_API_VERSION = "2023-01-01-preview"


def _azure_items(url: str, skus: list[str], chunk: int = 10) -> Iterable[dict]:
    for i in range(0, len(skus), chunk):
        names = " or ".join(f"armSkuName eq '{s}'" for s in skus[i : i + chunk])
        query = {
            "api-version": AZURE_API_VERSION,
            "$filter": f"serviceName eq 'Virtual Machines' and priceType eq 'Consumption' and ({names})",
        }
        next_url: str | None = f"{url}?{urllib.parse.urlencode(query)}"
        pages = 0
        while next_url:
            pages += 1
            if pages > MAX_PAGES:
                raise RefreshError(f"Azure: more than {MAX_PAGES} pages from {_safe_url(url)}")
            doc = get_json(next_url)
            if not isinstance(doc, dict) or not isinstance(doc.get("Items"), list):
                raise RefreshError(f"Azure: unexpected response shape from {_safe_url(next_url)}")
            yield from doc["Items"]
            next_url = doc.get("NextPageLink") or None


def refresh_azure(base: list[Offer], *, url: str, today: str) -> list[Offer]:
    shapes: dict[str, Offer] = {}
    for o in base:
        shapes.setdefault(o.instance_type, o)
    # (region, sku) -> {"spot"|"od": (effectiveStartDate, price)}
    found: dict[tuple[str, str], dict[str, tuple[str, float]]] = defaultdict(dict)
    for item in _azure_items(url, sorted(shapes)):
        sku = item.get("armSkuName")
        if sku not in shapes or item.get("type") != "Consumption" or item.get("unitOfMeasure") != "1 Hour":
            continue
        if "Windows" in str(item.get("productName", "")) or "Low Priority" in str(item.get("skuName", "")):
            continue
        if item.get("isPrimaryMeterRegion") is False:
            continue
        kind = "spot" if "Spot" in str(item.get("skuName", "")) else "od"
        key = (str(item.get("armRegionName")), sku)
        start = str(item.get("effectiveStartDate", ""))
        if kind not in found[key] or start > found[key][kind][0]:
            found[key][kind] = (start, float(item["retailPrice"]))
    prior = {(o.region, o.instance_type): o for o in base}
    rows = []
    for (region, sku), prices in sorted(found.items()):
        shape = prior.get((region, sku)) or shapes[sku]
        od = prices["od"][1] if "od" in prices else None
        spot = prices["spot"][1] if "spot" in prices else None
        if od is None and spot is None:
            continue
        rows.append(replace(shape, region=region, zone="", spot_price=spot, ondemand_price=od, observed=today))
    return rows


def refresh_offers(
    base: list[Offer], previous: list[Offer], env: Mapping[str, str], today: str
) -> tuple[list[Offer], list[str], list[str]]:
    """The catalog driver's entry point: (rows, errors, warnings)."""
    return refresh_azure(base, url=env.get("SPOTRUN_AZURE_PRICES_URL", AZURE_PRICES_URL), today=today), [], []
