"""GCP prices for `spotrun catalog refresh`: the Cloud Billing Catalog API SKUs of Compute Engine (API
key from `SPOTRUN_GCP_API_KEY`, sent in the `X-Goog-Api-Key` header so it never appears in a URL or
a message). A VM price is rebuilt as vCPUs x core SKU + GiB x RAM SKU + GPUs x GPU SKU of its family
and region. `SPOTRUN_GCP_BILLING_URL` points it at a fake.
"""

from __future__ import annotations

import re
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from spotrun.catalog.http import MAX_PAGES, RefreshError, _safe_url, get_json
from spotrun.catalog.model import Offer

GCP_BILLING_URL = "https://cloudbilling.googleapis.com"
GCP_COMPUTE_SERVICE = "6F81-5844-456A"  # Compute Engine's service id in the Cloud Billing Catalog


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


def refresh_offers(
    base: list[Offer], previous: list[Offer], env: Mapping[str, str], today: str
) -> tuple[list[Offer], list[str], list[str]]:
    """The catalog driver's entry point: (rows, errors, warnings)."""
    key = env.get("SPOTRUN_GCP_API_KEY", "")
    if not key:
        raise RefreshError("GCP: set SPOTRUN_GCP_API_KEY to a Cloud Billing API key")
    rows, warnings = refresh_gcp(
        base, base_url=env.get("SPOTRUN_GCP_BILLING_URL", GCP_BILLING_URL), api_key=key, today=today
    )
    return rows, [], warnings
