"""`spotrun catalog refresh`: fresh prices and interruption buckets from the providers' own APIs.

* AWS: `DescribeSpotPriceHistory` in each region (the price in effect now, per availability zone)
  and the Spot Advisor feed (savings and interruption bucket per region and type). On-demand
  prices stay those of the bundled snapshot (the Pricing API is a separate, heavy service).
* Azure: the Retail Prices API (no credentials; pages linked by `NextPageLink`), Linux spot and
  pay-as-you-go meters of the GPU sizes spotrun knows.
* GCP: the Cloud Billing Catalog API SKUs of Compute Engine (API key from `SPOTRUN_GCP_API_KEY`,
  sent in the `X-Goog-Api-Key` header so it never appears in a URL or a message). A VM price is
  rebuilt as vCPUs x core SKU + GiB x RAM SKU + GPUs x GPU SKU of its family and region.

A refresh never invents machine shapes: it re-prices the instance types of the bundled snapshot
(specs and zones come from there) and adds the regions/zones the API reports for them. Each
provider's result is written atomically to `<home>/catalog/<provider>.csv.gz`; a provider whose
fetch fails keeps its previous file, and the result says what failed. For AWS a failed region keeps
its previous rows while the other regions are updated.

Endpoints are overridable so tests can point them at local fakes and moto:
`AWS_ENDPOINT_URL` (boto3's own), `SPOTRUN_SPOT_ADVISOR_URL`, `SPOTRUN_AZURE_PRICES_URL`,
`SPOTRUN_GCP_BILLING_URL`; `SPOTRUN_AWS_REGIONS` (comma list) limits the AWS regions queried.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spotrun.catalog.interruption import advisor_bucket_rate
from spotrun.catalog.model import Offer

SPOT_ADVISOR_URL = "https://spot-bid-advisor.s3.amazonaws.com/spot-advisor-data.json"
AZURE_PRICES_URL = "https://prices.azure.com/api/retail/prices"
AZURE_API_VERSION = "2023-01-01-preview"
GCP_BILLING_URL = "https://cloudbilling.googleapis.com"
GCP_COMPUTE_SERVICE = "6F81-5844-456A"  # Compute Engine's service id in the Cloud Billing Catalog
HTTP_TIMEOUT_S = 30.0
MAX_PAGES = 500  # a runaway NextPageLink loop stops here


class RefreshError(Exception):
    """A fetch that failed; the message is safe to show (no keys, no query strings)."""


@dataclass
class RefreshResult:
    provider: str
    ok: bool
    rows: int = 0
    path: Path | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "ok": self.ok,
            "rows": self.rows,
            "path": str(self.path) if self.path else None,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------- HTTP


def _safe_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def get_json(url: str, headers: Mapping[str, str] | None = None, timeout: float = HTTP_TIMEOUT_S) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only)
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = ""
        try:
            body = json.loads(e.read().decode("utf-8", "replace"))
            err = body.get("error", body) if isinstance(body, dict) else {}
            detail = str(err.get("message") or err.get("Message") or "")[:200] if isinstance(err, dict) else ""
        except (ValueError, OSError):
            pass
        raise RefreshError(f"HTTP {e.code} from {_safe_url(url)}" + (f": {detail}" if detail else "")) from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RefreshError(f"cannot reach {_safe_url(url)}: {reason}") from None
    except ValueError:
        raise RefreshError(f"{_safe_url(url)} did not return JSON") from None


# --------------------------------------------------------------------------- AWS


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


# --------------------------------------------------------------------------- Azure


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


# --------------------------------------------------------------------------- GCP

_GCP_GPU = re.compile(
    r"^(?:Spot Preemptible )?Nvidia (?P<gpu>.+?) GPU(?: attached to Spot Preemptible VMs)? running in "
)
_GCP_HOST = re.compile(
    r"^(?:Spot Preemptible )?(?P<family>N1 Predefined|[A-Z]\d+[A-Za-z]*) Instance (?P<part>Core|Ram)"
)

# Host family -> the GPU SKU label its accelerators are billed under (N1 hosts: the attached GPU's).
_GCP_FAMILY_GPU = {
    "a2-highgpu": ("A100", False),
    "a2-megagpu": ("A100", False),
    "a2-ultragpu": ("A100 80GB", False),
    "a3-highgpu": ("H100 80GB", False),
    "a3-edgegpu": ("H100 80GB", False),
    "a3-megagpu": ("H100 80GB", True),
    "a3-ultragpu": ("H200 141GB", False),
    "a4-highgpu": ("B200", False),
    "g2-standard": ("L4", False),
}


def _gcp_gpu_key(label: str) -> tuple[str, float | None, bool] | None:
    """'Tesla T4' -> ('T4', None, False); 'H100 80GB Mega' -> ('H100', 80, True)."""
    from spotrun.gpus import parse_gpu

    mega = "mega" in label.lower()
    name, memory = parse_gpu(re.sub(r"(?i)\bmega\b", "", label).strip())
    if name is None:
        return None
    if name == "A100" and memory is None:
        memory = 40.0
    return name, memory, mega


def _gcp_unit_price(sku: dict) -> float | None:
    try:
        expression = sku["pricingInfo"][-1]["pricingExpression"]
        tiers = sorted(expression["tieredRates"], key=lambda t: float(t.get("startUsageAmount", 0)))
        rate = tiers[-1]["unitPrice"] if len(tiers) == 1 else next(
            (t["unitPrice"] for t in tiers if float(t.get("startUsageAmount", 0)) == 0 and t["unitPrice"].get("nanos")),
            tiers[-1]["unitPrice"],
        )  # fmt: skip
        return int(rate.get("units", 0) or 0) + int(rate.get("nanos", 0) or 0) / 1e9
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def gcp_skus(base_url: str, api_key: str) -> Iterable[dict]:
    url = f"{base_url.rstrip('/')}/v1/services/{GCP_COMPUTE_SERVICE}/skus"
    token = ""
    for _ in range(MAX_PAGES):
        query = {"currencyCode": "USD", "pageSize": "5000", **({"pageToken": token} if token else {})}
        doc = get_json(f"{url}?{urllib.parse.urlencode(query)}", headers={"X-Goog-Api-Key": api_key})
        if not isinstance(doc, dict):
            raise RefreshError(f"GCP: unexpected response shape from {_safe_url(url)}")
        yield from doc.get("skus", [])
        token = doc.get("nextPageToken") or ""
        if not token:
            return
    raise RefreshError(f"GCP: more than {MAX_PAGES} pages from {_safe_url(url)}")


def refresh_gcp(base: list[Offer], *, base_url: str, api_key: str, today: str) -> tuple[list[Offer], list[str]]:
    # price[(kind, spot)][region] = USD per unit; kind = ("gpu", key) | ("core"|"ram", family)
    price: dict[tuple[Any, bool], dict[str, float]] = defaultdict(dict)
    for sku in gcp_skus(base_url, api_key):
        category = sku.get("category", {})
        usage = category.get("usageType")
        if usage not in ("OnDemand", "Preemptible"):
            continue
        spot = usage == "Preemptible"
        desc = str(sku.get("description", ""))
        unit = _gcp_unit_price(sku)
        if unit is None:
            continue
        kind: Any = None
        if m := _GCP_GPU.match(desc):
            gpu_key = _gcp_gpu_key(m.group("gpu"))
            kind = ("gpu", gpu_key) if gpu_key else None
        elif m := _GCP_HOST.match(desc):
            family = m.group("family").split()[0].lower()
            kind = ("core" if m.group("part") == "Core" else "ram", family)
        if kind is None:
            continue
        for region in sku.get("serviceRegions", []):
            price[(kind, spot)][region] = unit

    rows: list[Offer] = []
    missing: set[str] = set()
    for o in base:
        family = "-".join(o.instance_type.split("-")[:2])
        label = _GCP_FAMILY_GPU.get(family)
        if label is not None:
            gpu_key = _gcp_gpu_key(label[0])
            gpu_key = (gpu_key[0], gpu_key[1], label[1]) if gpu_key else None
        else:  # N1 + attached GPU: the offer's own GPU
            model_memory = None if o.gpu != "A100" else o.gpu_memory_gb
            gpu_key = (o.gpu, model_memory, False) if o.gpu else None
        host = o.instance_type.split("-")[0]
        ram_gib = round(o.memory_gb / 1.073741824, 2)  # the snapshot stores GB; GCP bills GiB
        prices = {}
        for spot in (False, True):
            core = price[(("core", host), spot)].get(o.region)
            ram = price[(("ram", host), spot)].get(o.region)
            gpu = price[(("gpu", gpu_key), spot)].get(o.region)
            prices[spot] = (
                round(o.vcpus * core + ram_gib * ram + o.gpu_count * gpu, 5) if None not in (core, ram, gpu) else None
            )
        if prices[False] is None and prices[True] is None:
            missing.add(f"{o.instance_type} in {o.region}")
            continue
        rows.append(replace(o, ondemand_price=prices[False], spot_price=prices[True], observed=today))
    warnings = []
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        warnings.append(
            f"{len(missing)} GCP type/region pairs had no SKU price and keep their bundled rows ({shown}, …)"
        )
    return rows, warnings


# --------------------------------------------------------------------------- driver


def refresh(
    providers: Iterable[str] | None = None,
    *,
    directory: Path | None = None,
    environ: Mapping[str, str] | None = None,
    today: str | None = None,
) -> list[RefreshResult]:
    """Refresh each provider; write each success atomically, leave each failure's previous file."""
    from spotrun.catalog import PROVIDERS, bundled_offers, cache_dir, refreshed_path
    from spotrun.catalog.snapshot import read_file, write_file

    env = os.environ if environ is None else environ
    day = today or dt.date.today().isoformat()
    directory = directory or cache_dir()
    bundled = bundled_offers()
    results = []
    for provider in providers or PROVIDERS:
        base = [o for o in bundled if o.provider == provider]
        path = refreshed_path(provider, directory)
        result = RefreshResult(provider, ok=False)
        try:
            if provider == "aws":
                previous = read_file(path) if path.is_file() else base
                regions = [r.strip() for r in env.get("SPOTRUN_AWS_REGIONS", "").split(",") if r.strip()] or None
                rows, result.errors, result.warnings = refresh_aws(
                    base, previous, regions=regions, advisor_url=env.get("SPOTRUN_SPOT_ADVISOR_URL", SPOT_ADVISOR_URL),
                    today=day,
                )  # fmt: skip
            elif provider == "azure":
                rows = refresh_azure(base, url=env.get("SPOTRUN_AZURE_PRICES_URL", AZURE_PRICES_URL), today=day)
            elif provider == "gcp":
                key = env.get("SPOTRUN_GCP_API_KEY", "")
                if not key:
                    raise RefreshError("GCP: set SPOTRUN_GCP_API_KEY to a Cloud Billing API key")
                rows, result.warnings = refresh_gcp(
                    base, base_url=env.get("SPOTRUN_GCP_BILLING_URL", GCP_BILLING_URL), api_key=key, today=day
                )
            else:
                raise RefreshError(f"unknown provider {provider!r}")
            if not rows:
                raise RefreshError(f"{provider}: the API returned no prices for any known GPU instance type")
            result.rows = write_file(path, rows)
            result.path = path
            result.ok = True
        except RefreshError as e:
            result.errors.append(str(e))
        except ImportError as e:
            result.errors.append(f"{provider}: missing package ({e.name}); install spotrun[{provider}]")
        results.append(result)
    return results
