"""The bundled catalog loads offline with all three clouds; refreshed rows override it; the
interruption conversions are the documented ones; `offers` and `plan` work from the command line."""

from __future__ import annotations

import gzip
import json
import math
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from spotrun import catalog
from spotrun.catalog.interruption import (
    AWS_TOP_BUCKET_RATE,
    advisor_bucket_rate,
    advisor_bucket_rate_monthly,
    availability_trace_stats,
    cluster_removal_rate,
    rate_from_counts,
)
from spotrun.catalog.snapshot import read_file, write_file

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_bundled_catalog_loads_offline_with_all_providers() -> None:
    offers = catalog.load_offers()
    by_provider = {p: [o for o in offers if o.provider == p] for p in catalog.PROVIDERS}
    for provider, rows in by_provider.items():
        gpus = {o.gpu for o in rows}
        assert {"A100", "H100"} <= gpus, provider
        assert all(o.interruption_rate > 0 for o in rows), provider
        assert all(o.ondemand_price is None or o.ondemand_price > 0 for o in rows)
        assert all(o.observed for o in rows)
        assert any(o.spot_price for o in rows)
    assert any(o.interruption_source.startswith("measured:aws-spot-advisor") for o in by_provider["aws"])
    assert any(o.interruption_source.startswith("measured:skynomad") for o in by_provider["gcp"])
    assert all(o.zone for o in by_provider["gcp"]) and not any(o.zone for o in by_provider["azure"])
    keys = [o.key for o in offers]
    assert len(keys) == len(set(keys)), "offer keys must be unique"


def test_load_offers_by_provider() -> None:
    assert {o.provider for o in catalog.load_offers(["gcp"])} == {"gcp"}
    assert catalog.load_offers([]) == []


def test_refreshed_rows_replace_bundled_rows_of_the_same_type_and_region(spotrun_home: Path) -> None:
    bundled = catalog.load_offers(["aws"])
    old = next(o for o in bundled if o.region == "us-east-1" and o.instance_type == "p3.2xlarge")
    fresh = [replace(old, zone=z, spot_price=0.99, observed="2099-01-01") for z in ("us-east-1a", "us-east-1b")]
    write_file(catalog.refreshed_path("aws"), fresh)
    merged = catalog.load_offers(["aws"])
    rows = [o for o in merged if o.region == "us-east-1" and o.instance_type == "p3.2xlarge"]
    assert sorted(o.zone for o in rows) == ["us-east-1a", "us-east-1b"]
    assert len(merged) == len(bundled) + 1  # one region row became two zone rows
    assert catalog.load_offers(["gcp"]) == catalog.bundled_offers()[:0] + [
        o for o in catalog.bundled_offers() if o.provider == "gcp"
    ]


def test_damaged_cache_never_hides_the_bundled_catalog(spotrun_home: Path) -> None:
    path = catalog.refreshed_path("azure")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not gzip")
    assert len(catalog.load_offers(["azure"])) == len([o for o in catalog.bundled_offers() if o.provider == "azure"])


def test_snapshot_round_trip(tmp_path: Path) -> None:
    rows = catalog.bundled_offers()[:50]
    write_file(tmp_path / "x.csv.gz", rows)
    assert read_file(tmp_path / "x.csv.gz") == rows
    with gzip.open(tmp_path / "bad.csv.gz", "wt") as fh:
        fh.write("provider,bogus\naws,1\n")
    with pytest.raises(ValueError, match="unknown offer columns: bogus"):
        read_file(tmp_path / "bad.csv.gz")


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data not present")
def test_committed_catalog_is_what_the_build_script_makes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_catalog", Path(__file__).parent.parent / "scripts/build_catalog.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    offers, meta = module.build(DATA)
    assert offers == catalog.bundled_offers()
    committed = json.loads((catalog.BUNDLED.parent / "meta.json").read_text())
    assert meta["rows_by_provider"] == committed["rows_by_provider"]


# --------------------------------------------------------------------------- interruption rates


def test_advisor_buckets_are_calibrated_on_the_aws_traces() -> None:
    assert advisor_bucket_rate(4) == pytest.approx(AWS_TOP_BUCKET_RATE) == pytest.approx(1138 / 4200)
    rates = [advisor_bucket_rate(b) for b in range(5)]
    assert rates == sorted(rates)
    # Shape: proportional to -ln(1 - share): "<5%" (2.5%) vs ">20%" (25%).
    assert rates[0] / rates[4] == pytest.approx(math.log(1 - 0.025) / math.log(1 - 0.25))
    # The literal per-month reading would be ~690x lower for the top bucket.
    assert advisor_bucket_rate_monthly(4) == pytest.approx(-math.log(0.75) / 730)


def test_availability_trace_stats() -> None:
    # preempted convention: 0 up, 1 down; 10-minute ticks. Up 6 ticks (1 h), 2 up->down transitions.
    trace = [0, 0, 1, 0, 0, 1, 1, 0, 0, 1]
    assert availability_trace_stats(trace, 600) == (3, 1.0, 0.6)
    # A skipped (synthetic) tick breaks the sequence: the transition across it is not counted.
    assert availability_trace_stats([0, 0, 1], 600, skip=[1]) == (0, 1 / 6, 0.5)
    assert rate_from_counts(0, 10.0) == 0.05  # never failed while observed: half a transition
    assert rate_from_counts(3, 0.0) is None


def test_cluster_removal_rate() -> None:
    samples = [(0.0, 10), (3600.0, 8), (7200.0, 9), (10800.0, 9)]
    assert cluster_removal_rate(samples) == (2, 27.0)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli() -> typer.Typer:
    from spotrun.cli import market as cli_market

    app = typer.Typer()
    app.command()(cli_market.offers)
    app.command("plan")(cli_market.plan)
    app.add_typer(cli_market.catalog_app, name="catalog")
    return app


def test_offers_a100_table_across_clouds(cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["offers", "--gpu", "A100", "--limit", "0"])
    assert result.exit_code == 0, result.output
    for provider in ("aws/", "gcp/", "azure/"):
        assert provider in result.output
    assert "interrupts/h" in result.output


def test_offers_h100_json(cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["offers", "--gpu", "H100", "--json", "--limit", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = data["offers"]
    assert {r["provider"] for r in rows} == {"aws", "gcp", "azure"}
    assert all(r["gpu"] == "H100" and r["interruption_rate"] > 0 for r in rows)
    assert data["total"] == len(rows)
    prices = [r["spot_price"] if r["spot_price"] is not None else r["ondemand_price"] for r in rows]
    assert prices == sorted(prices)


def test_offers_filters_and_sorts(cli: typer.Typer) -> None:
    args = ["offers", "--gpu", "T4", "--count", "1", "--provider", "gcp", "--region", "us-*", "--spot",
            "--max-price", "0.5", "--sort", "interruption", "--json", "--limit", "0"]  # fmt: skip
    rows = json.loads(CliRunner().invoke(cli, args).output)["offers"]
    assert rows and all(
        r["provider"] == "gcp" and r["region"].startswith("us-") and r["gpu_count"] == 1 and r["spot_price"] <= 0.5
        for r in rows
    )
    assert [r["interruption_rate"] for r in rows] == sorted(r["interruption_rate"] for r in rows)
    memory = json.loads(CliRunner().invoke(cli, ["offers", "--gpu", "A100-80GB", "--json", "--limit", "0"]).output)
    assert memory["offers"] and all(r["gpu_memory_gb"] >= 76 for r in memory["offers"])
    expected = json.loads(CliRunner().invoke(cli, ["offers", "--gpu", "H100", "--sort", "expected", "--json"]).output)
    costs = [r["expected_cost_per_a100_hour"] for r in expected["offers"]]
    assert costs == sorted(costs)


def test_offers_bad_input(cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["offers", "--gpu", "Z9000"])
    assert result.exit_code == 2 and "unknown GPU" in result.output


def write_spec(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text("name: demo\nrun: python train.py\n" + textwrap.dedent(body))
    return path


def test_plan_shows_choice_breakdown_and_on_demand(cli: typer.Typer, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "resources:\n  gpu: A100\n  providers: [aws, gcp, azure]\nworkload:\n  hours: 8\n")
    result = CliRunner().invoke(cli, ["plan", str(spec)])
    assert result.exit_code == 0, result.output
    for text in ("chosen:", "compute", "restarts", "egress", "on-demand equivalent", "assumption"):
        assert text in result.output
    data = json.loads(CliRunner().invoke(cli, ["plan", str(spec), "--json", "--limit", "3"]).output)
    assert len(data["candidates"]) == 3 and data["chosen"] == data["candidates"][0]
    assert data["ondemand_baseline"]["expected_cost"] > data["chosen"]["expected_cost"]


def test_plan_exit_codes(cli: typer.Typer, tmp_path: Path) -> None:
    bad = write_spec(tmp_path, "resources:\n  gpu: A1OO\n")
    result = CliRunner().invoke(cli, ["plan", str(bad)])
    assert result.exit_code == 2 and "unknown GPU 'A1OO'" in result.output
    nothing = write_spec(tmp_path, "resources:\n  gpu: A100\n  providers: [gcp]\n  max_price: 0.01\n")
    result = CliRunner().invoke(cli, ["plan", str(nothing)])
    assert result.exit_code == 3 and "above max price" in result.output


def test_catalog_info(cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["catalog", "info", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert all(data["providers"][p]["offers"] > 100 for p in catalog.PROVIDERS)


def test_parsed_copy_is_used_and_survives_damage(spotrun_home: Path) -> None:
    catalog._parsed.clear()
    first = catalog.load_offers(["gcp"])
    (copy,) = catalog.cache_dir().glob(".parsed-offers-*.marshal")
    catalog._parsed.clear()
    assert catalog.load_offers(["gcp"]) == first  # from the marshal'd copy
    copy.write_bytes(b"\x00garbage")
    catalog._parsed.clear()
    assert catalog.load_offers(["gcp"]) == first  # damaged copy: parsed again, and rewritten
    assert copy.read_bytes() != b"\x00garbage"
