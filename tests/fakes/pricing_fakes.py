"""Local fakes of the public price APIs `spotrun catalog refresh` reads, shaped like the real ones.

* `AzurePricesFake`: the Azure Retail Prices API (`GET /api/retail/prices?api-version=…&$filter=…`),
  answering `{"BillingCurrency", "CustomerEntityId", "CustomerEntityType", "Items": [...],
  "NextPageLink": url|null, "Count"}` as documented at
  learn.microsoft.com/rest/api/cost-management/retail-prices/azure-retail-prices, `page_size` items
  a page, next pages linked with `$skip`. It applies the `armSkuName eq '…'` terms of `$filter`.
* `GcpBillingFake`: the Cloud Billing Catalog API (`GET /v1/services/{service}/skus`), answering
  `{"skus": [...], "nextPageToken": "…"}` (empty token on the last page) with SKUs shaped as in
  cloud.google.com/billing/docs/reference/rest/v1/services.skus, and the API's 403
  `PERMISSION_DENIED` body when the `X-Goog-Api-Key` header is missing or wrong.
* The AWS Spot Advisor feed (`/spot-advisor-data.json`), served by `AzurePricesFake` too (any of
  the fakes could; this keeps one server per test).

`fail_on_page = n` makes the n-th page request (1-based) answer HTTP 500, for partial failures.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from tests.fakes.rest_fake import Request, Response, RestFake


def azure_item(sku: str, region: str, price: float, *, spot: bool = False, windows: bool = False,
               low_priority: bool = False, start: str = "2025-01-01T00:00:00Z") -> dict[str, Any]:  # fmt: skip
    """One Retail Prices item, with every field the real API returns."""
    size = sku.removeprefix("Standard_").replace("_", " ")
    sku_name = size + (" Spot" if spot else " Low Priority" if low_priority else "")
    series = size.split()[0]
    return {
        "currencyCode": "USD",
        "tierMinimumUnits": 0.0,
        "retailPrice": price,
        "unitPrice": price,
        "armRegionName": region,
        "location": region,
        "effectiveStartDate": start,
        "meterId": f"meter-{sku}-{region}-{spot}-{windows}",
        "meterName": sku_name,
        "productId": f"DZH318Z0{series[:4].upper()}",
        "skuId": f"DZH318Z0{series[:4].upper()}/00{len(sku_name)}",
        "availabilityId": None,
        "productName": f"Virtual Machines {series} Series" + (" Windows" if windows else ""),
        "skuName": sku_name,
        "serviceName": "Virtual Machines",
        "serviceId": "DZH313Z7MMC8",
        "serviceFamily": "Compute",
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
        "isPrimaryMeterRegion": True,
        "armSkuName": sku,
    }


class AzurePricesFake(RestFake):
    def __init__(self, items: list[dict[str, Any]], *, page_size: int = 2, advisor: dict | None = None) -> None:
        super().__init__()
        self.items = items
        self.page_size = page_size
        self.advisor = advisor
        self.fail_on_page: int | None = None
        self.pages_served = 0
        self.route("GET", r"/api/retail/prices", self._prices)
        self.route("GET", r"/spot-advisor-data\.json", self._advisor)

    def _advisor(self, req: Request) -> Response:
        if self.advisor is None:
            return Response(403, "<Error><Code>AccessDenied</Code></Error>")
        return Response(200, self.advisor)

    def _prices(self, req: Request) -> Response:
        self.pages_served += 1
        if self.fail_on_page is not None and self.pages_served >= self.fail_on_page:
            return Response(500, {"Error": {"Code": "InternalServerError", "Message": "try again later"}})
        if not req.query.get("api-version"):
            return Response(400, {"Error": {"Code": "BadRequest", "Message": "api-version is required"}})
        flt = req.query.get("$filter", "")
        wanted = set(re.findall(r"armSkuName eq '([^']+)'", flt))
        matching = [i for i in self.items if not wanted or i["armSkuName"] in wanted]
        if "priceType eq 'Consumption'" in flt:
            matching = [i for i in matching if i["type"] == "Consumption"]
        skip = int(req.query.get("$skip", "0"))
        page = matching[skip : skip + self.page_size]
        more = skip + self.page_size < len(matching)
        next_link = None
        if more:
            query = {k: v for k, v in req.query.items() if k != "$skip"} | {"$skip": str(skip + self.page_size)}
            next_link = f"{self.url}/api/retail/prices?{urlencode(query)}"
        return Response(
            200,
            {
                "BillingCurrency": "USD",
                "CustomerEntityId": "Default",
                "CustomerEntityType": "Retail",
                "Items": page,
                "NextPageLink": next_link,
                "Count": len(page),
            },
        )


# --------------------------------------------------------------------------- GCP

GCP_REGION_GEO = {"us-central1": "Americas", "us-east4": "Virginia", "europe-west4": "Netherlands"}


def gcp_sku(description: str, regions: list[str], usd: float, *, usage: str = "OnDemand",
            group: str = "GPU", unit: str = "h") -> dict[str, Any]:  # fmt: skip
    """One Compute Engine SKU as the Cloud Billing Catalog returns it."""
    units, nanos = int(usd), round((usd - int(usd)) * 1e9)
    sku_id = f"{abs(hash((description, tuple(regions), usage))) % 0xFFFF:04X}-{len(description):04X}-ABCD"
    return {
        "name": f"services/6F81-5844-456A/skus/{sku_id}",
        "skuId": sku_id,
        "description": description,
        "category": {
            "serviceDisplayName": "Compute Engine",
            "resourceFamily": "Compute",
            "resourceGroup": group,
            "usageType": usage,
        },
        "serviceRegions": regions,
        "pricingInfo": [
            {
                "summary": "",
                "pricingExpression": {
                    "usageUnit": unit,
                    "displayQuantity": 1,
                    "tieredRates": [
                        {
                            "startUsageAmount": 0,
                            "unitPrice": {"currencyCode": "USD", "units": str(units), "nanos": nanos},
                        }
                    ],
                    "usageUnitDescription": "hour" if unit == "h" else "gibibyte hour",
                    "baseUnit": "s" if unit == "h" else "By.s",
                    "baseUnitDescription": "second" if unit == "h" else "byte second",
                    "baseUnitConversionFactor": 3600 if unit == "h" else 3865470566400,
                },
                "currencyConversionRate": 1,
                "effectiveTime": "2025-10-22T19:53:14.655269Z",
            }
        ],
        "serviceProviderName": "Google",
        "geoTaxonomy": {"type": "REGIONAL", "regions": regions},
    }


class GcpBillingFake(RestFake):
    def __init__(self, skus: list[dict[str, Any]], *, api_key: str, page_size: int = 3) -> None:
        super().__init__()
        self.skus = skus
        self.api_key = api_key
        self.page_size = page_size
        self.fail_on_page: int | None = None
        self.pages_served = 0
        self.route("GET", r"/v1/services/(?P<service>[^/]+)/skus", self._skus)

    def _skus(self, req: Request) -> Response:
        if req.header("x-goog-api-key") != self.api_key or "key" in req.query:
            return Response(
                403,
                {
                    "error": {
                        "code": 403,
                        "message": "The request is missing a valid API key.",
                        "status": "PERMISSION_DENIED",
                    }
                },
            )
        if req.params["service"] != "6F81-5844-456A":
            return Response(404, {"error": {"code": 404, "message": "Service not found.", "status": "NOT_FOUND"}})
        self.pages_served += 1
        if self.fail_on_page is not None and self.pages_served >= self.fail_on_page:
            return Response(500, {"error": {"code": 500, "message": "Internal error.", "status": "INTERNAL"}})
        start = int(req.query.get("pageToken") or 0)
        size = min(self.page_size, int(req.query.get("pageSize", self.page_size)))
        page = self.skus[start : start + size]
        token = str(start + size) if start + size < len(self.skus) else ""
        return Response(200, {"skus": page, "nextPageToken": token})
