"""`spotrun catalog refresh` against moto (AWS) and local fakes of the Azure Retail Prices and GCP
Cloud Billing Catalog APIs: prices land in the cache, a failing provider keeps its previous file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spotrun import catalog
from spotrun.catalog.interruption import advisor_bucket_rate
from spotrun.catalog.refresh import refresh
from spotrun.catalog.snapshot import read_file, write_file
from tests.fakes.moto_server import MotoServer, aws, moto_server  # noqa: F401  (pytest fixtures)
from tests.fakes.pricing_fakes import AzurePricesFake, GcpBillingFake, azure_item, gcp_sku

GCP_KEY = "AIzaSy-test-key-must-never-be-logged"
ADVISOR = {
    "ranges": [
        {"index": 0, "label": "<5%", "dots": 0, "max": 5},
        {"index": 1, "label": "5-10%", "dots": 1, "max": 11},
        {"index": 2, "label": "10-15%", "dots": 2, "max": 16},
        {"index": 3, "label": "15-20%", "dots": 3, "max": 22},
        {"index": 4, "label": ">20%", "dots": 4, "max": 100},
    ],
    "spot_advisor": {"us-east-1": {"Linux": {"g4dn.xlarge": {"s": 60, "r": 0}, "p3.2xlarge": {"s": 70, "r": 4}}}},
    "instance_types": {"g4dn.xlarge": {"emr": True, "cores": 4, "ram_gb": 16.0}},
    "global_rate": "<10%",
}
A100 = "Standard_NC24ads_A100_v4"
H100 = "Standard_NC40ads_H100_v5"


@pytest.fixture(scope="module")
def azure_server() -> Iterator[AzurePricesFake]:
    items = [
        azure_item(A100, "eastus", 3.50),
        azure_item(A100, "eastus", 0.70, spot=True),
        azure_item(A100, "eastus", 9.99, windows=True),  # Windows meters are ignored
        azure_item(A100, "eastus", 0.01, low_priority=True),  # so are Low Priority ones
        azure_item(A100, "eastus", 3.10, start="2020-01-01T00:00:00Z"),  # an older price
        azure_item(A100, "westus9", 4.00),  # a region the snapshot does not have yet
        azure_item(H100, "eastus2", 6.50),
        azure_item(H100, "eastus2", 1.20, spot=True),
        azure_item("Standard_D2s_v5", "eastus", 0.1),  # not a GPU size: never asked for
    ]
    fake = AzurePricesFake(items, page_size=2, advisor=ADVISOR).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def gcp_server() -> Iterator[GcpBillingFake]:
    r = ["us-central1"]
    skus = [
        gcp_sku("Nvidia Tesla A100 GPU running in Americas", r, 2.933908),
        gcp_sku("Nvidia Tesla A100 GPU attached to Spot Preemptible VMs running in Americas", r, 1.4341,
                usage="Preemptible"),
        gcp_sku("A2 Instance Core running in Americas", r, 0.031611, group="CPU"),
        gcp_sku("A2 Instance Ram running in Americas", r, 0.004237, group="RAM", unit="GiBy.h"),
        gcp_sku("Spot Preemptible A2 Instance Core running in Americas", r, 0.0158, group="CPU", usage="Preemptible"),
        gcp_sku("Spot Preemptible A2 Instance Ram running in Americas", r, 0.0021, group="RAM", unit="GiBy.h",
                usage="Preemptible"),
        gcp_sku("Nvidia Tesla T4 GPU running in Americas", r, 0.35),
        gcp_sku("Nvidia Tesla T4 GPU attached to Spot Preemptible VMs running in Americas", r, 0.14,
                usage="Preemptible"),
        gcp_sku("N1 Predefined Instance Core running in Americas", r, 0.031611, group="N1Standard"),
        gcp_sku("N1 Predefined Instance Ram running in Americas", r, 0.004237, group="N1Standard", unit="GiBy.h"),
        gcp_sku("Spot Preemptible N1 Predefined Instance Core running in Americas", r, 0.0071, group="N1Standard",
                usage="Preemptible"),
        gcp_sku("Spot Preemptible N1 Predefined Instance Ram running in Americas", r, 0.00095, group="N1Standard",
                unit="GiBy.h", usage="Preemptible"),
        gcp_sku("Commitment v1: A2 Cpu in Americas for 1 Year", r, 0.01, group="CPU", usage="Commit1Yr"),
    ]  # fmt: skip
    fake = GcpBillingFake(skus, api_key=GCP_KEY, page_size=4).start()
    yield fake
    fake.stop()


# The servers start once per module (stopping one takes half a second); each test gets them fresh.
@pytest.fixture
def azure_fake(azure_server: AzurePricesFake) -> AzurePricesFake:
    azure_server.fail_on_page, azure_server.pages_served, azure_server.requests = None, 0, []
    return azure_server


@pytest.fixture
def gcp_fake(gcp_server: GcpBillingFake) -> GcpBillingFake:
    gcp_server.fail_on_page, gcp_server.pages_served, gcp_server.requests = None, 0, []
    return gcp_server


def env_for(azure: AzurePricesFake, gcp: GcpBillingFake, **extra: str) -> dict[str, str]:
    import os

    return {
        **os.environ,
        "SPOTRUN_AZURE_PRICES_URL": f"{azure.url}/api/retail/prices",
        "SPOTRUN_SPOT_ADVISOR_URL": f"{azure.url}/spot-advisor-data.json",
        "SPOTRUN_GCP_BILLING_URL": gcp.url,
        "SPOTRUN_GCP_API_KEY": GCP_KEY,
        "SPOTRUN_AWS_REGIONS": "us-east-1",
        **extra,
    }


def test_azure_refresh_follows_next_page_links(azure_fake: AzurePricesFake, gcp_fake: GcpBillingFake) -> None:
    (result,) = refresh(["azure"], environ=env_for(azure_fake, gcp_fake), today="2030-01-02")
    assert result.ok, result.errors
    assert azure_fake.pages_served >= 4  # 8 matching items, 2 a page
    rows = {(o.region, o.instance_type): o for o in read_file(result.path)}  # type: ignore[arg-type]
    a100 = rows[("eastus", A100)]
    assert (a100.ondemand_price, a100.spot_price, a100.observed) == (3.50, 0.70, "2030-01-02")
    assert (a100.gpu, a100.gpu_count, a100.gpu_memory_gb) == ("A100", 1, 80.0)  # specs from the snapshot
    assert rows[("westus9", A100)].ondemand_price == 4.00 and rows[("westus9", A100)].spot_price is None
    assert rows[("eastus2", H100)].spot_price == 1.20
    assert not any(o.instance_type == "Standard_D2s_v5" for o in rows.values())
    merged = {(o.region, o.instance_type): o for o in catalog.load_offers(["azure"])}
    assert merged[("eastus", A100)].spot_price == 0.70
    assert ("westus9", A100) in merged
    bundled_other = [
        o for o in catalog.bundled_offers() if o.provider == "azure" and o.instance_type not in (A100, H100)
    ]
    assert all((o.region, o.instance_type) in merged for o in bundled_other)


def test_gcp_refresh_rebuilds_vm_prices_from_skus(azure_fake: AzurePricesFake, gcp_fake: GcpBillingFake) -> None:
    (result,) = refresh(["gcp"], environ=env_for(azure_fake, gcp_fake), today="2030-01-02")
    assert result.ok, result.errors
    rows = read_file(result.path)  # type: ignore[arg-type]
    a2 = next(o for o in rows if o.zone == "us-central1-a" and o.instance_type == "a2-highgpu-1g")
    assert a2.ondemand_price == pytest.approx(12 * 0.031611 + 85 * 0.004237 + 2.933908, rel=1e-5)
    assert a2.spot_price == pytest.approx(12 * 0.0158 + 85 * 0.0021 + 1.4341, rel=1e-5)
    n1 = next(o for o in rows if o.zone == "us-central1-a" and o.instance_type == "n1-standard-4" and o.gpu == "T4")
    assert n1.ondemand_price == pytest.approx(4 * 0.031611 + 15 * 0.004237 + 0.35, rel=1e-5)
    assert {o.region for o in rows} == {"us-central1"}  # only us-central1 has SKUs in the fake
    assert not any(o.gpu == "V100" for o in rows)  # no V100 SKU: those rows keep their bundled prices
    assert result.warnings and "no SKU price" in result.warnings[0]
    # The key travels in a header, never in a URL.
    assert all(r.header("x-goog-api-key") == GCP_KEY and "key" not in r.query for r in gcp_fake.requests)
    assert gcp_fake.pages_served == 4  # 13 SKUs, 4 a page


def test_gcp_refresh_needs_a_valid_key(azure_fake: AzurePricesFake, gcp_fake: GcpBillingFake) -> None:
    (missing,) = refresh(["gcp"], environ=env_for(azure_fake, gcp_fake, SPOTRUN_GCP_API_KEY=""))
    assert not missing.ok and "SPOTRUN_GCP_API_KEY" in missing.errors[0]
    (wrong,) = refresh(["gcp"], environ=env_for(azure_fake, gcp_fake, SPOTRUN_GCP_API_KEY="wrong-key-123"))
    assert not wrong.ok
    assert "HTTP 403" in wrong.errors[0] and "missing a valid API key" in wrong.errors[0]
    assert "wrong-key-123" not in " ".join(wrong.errors)


def test_aws_refresh_per_zone_prices_and_advisor_buckets(
    aws: MotoServer,  # noqa: F811
    azure_fake: AzurePricesFake,
    gcp_fake: GcpBillingFake,
) -> None:
    (result,) = refresh(["aws"], environ=env_for(azure_fake, gcp_fake), today="2030-01-02")
    assert result.ok, result.errors
    rows = read_file(result.path)  # type: ignore[arg-type]
    g4 = [o for o in rows if o.instance_type == "g4dn.xlarge"]
    # moto lists g4dn.xlarge in 5 zones of us-east-1, each at its placeholder spot price.
    assert len(g4) == 5 and all(o.zone.startswith("us-east-1") for o in g4)
    assert all(o.spot_price == 0.00001 and o.observed == "2030-01-02" for o in g4)
    assert all(o.interruption_rate == pytest.approx(advisor_bucket_rate(0), abs=1e-5) for o in g4)
    # p3 has no price history in moto: its region row is re-priced from the advisor's savings.
    (p3,) = [o for o in rows if o.instance_type == "p3.2xlarge"]
    assert p3.zone == "" and p3.spot_price == pytest.approx(p3.ondemand_price * 0.30, abs=1e-5)  # type: ignore[operator]
    assert p3.interruption_rate == pytest.approx(advisor_bucket_rate(4), abs=1e-5)
    assert {o.region for o in rows} == {"us-east-1"}
    merged = catalog.load_offers(["aws"])
    assert len([o for o in merged if o.region == "us-east-1" and o.instance_type == "g4dn.xlarge"]) == 5
    assert any(o.region == "eu-west-1" for o in merged)  # other regions still come from the snapshot


def test_partial_failure_keeps_previous_catalog_and_says_what_failed(
    aws: MotoServer,  # noqa: F811
    azure_fake: AzurePricesFake,
    gcp_fake: GcpBillingFake,
    spotrun_home: Path,
) -> None:
    previous = [o for o in catalog.bundled_offers() if o.provider == "gcp"][:3]
    path = catalog.refreshed_path("gcp")
    write_file(path, previous)
    gcp_fake.fail_on_page = 2  # the first page arrives, the second one fails
    results = {r.provider: r for r in refresh(environ=env_for(azure_fake, gcp_fake))}
    assert results["aws"].ok and results["azure"].ok
    assert not results["gcp"].ok
    assert "HTTP 500" in results["gcp"].errors[0] and GCP_KEY not in results["gcp"].errors[0]
    assert read_file(path) == previous  # untouched
    assert catalog.refreshed_path("azure").is_file() and catalog.refreshed_path("aws").is_file()


def test_unreachable_aws_keeps_previous_file(azure_fake: AzurePricesFake, gcp_fake: GcpBillingFake) -> None:
    env = env_for(
        azure_fake,
        gcp_fake,
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="y",
        AWS_MAX_ATTEMPTS="1",
        AWS_RETRY_MODE="standard",
    )
    import os

    old = dict(os.environ)
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")})  # fmt: skip
    try:
        (result,) = refresh(["aws"], environ=env)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert not result.ok
    assert "every region failed" in result.errors[0]
    assert not catalog.refreshed_path("aws").exists()


def test_refresh_command(
    azure_fake: AzurePricesFake, gcp_fake: GcpBillingFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from spotrun.cli.market import catalog_app

    app = typer.Typer()
    app.add_typer(catalog_app, name="catalog")
    for key, value in env_for(azure_fake, gcp_fake).items():
        if key.startswith("SPOTRUN_"):
            monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["catalog", "refresh", "--provider", "azure", "--provider", "gcp", "--json"])
    assert result.exit_code == 0, result.output
    assert [(r["provider"], r["ok"]) for r in json.loads(result.output)] == [("azure", True), ("gcp", True)]
    assert GCP_KEY not in result.output
    monkeypatch.setenv("SPOTRUN_GCP_API_KEY", "bad")
    result = CliRunner().invoke(app, ["catalog", "refresh", "--provider", "gcp"])
    assert result.exit_code == 1 and "kept the previous catalog" in result.output and "HTTP 403" in result.output
    assert CliRunner().invoke(app, ["catalog", "refresh", "--provider", "ibm"]).exit_code == 2
