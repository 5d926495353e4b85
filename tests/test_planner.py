"""The planner ranks by expected total cost: the arithmetic is checked by hand, offer by offer."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from spotrun.catalog.model import Offer
from spotrun.planner import plan
from spotrun.spec import JobSpec, parse_spec_text


def spec(tmp_path: Path, body: str) -> JobSpec:
    text = "name: demo\nrun: python train.py\n" + textwrap.dedent(body)
    return parse_spec_text(text, "job.yaml", base_dir=tmp_path, environ={})


def offer(
    zone: str = "us-central1-a",
    itype: str = "a2-highgpu-1g",
    *,
    provider: str = "gcp",
    gpu: str | None = "A100",
    count: int = 1,
    memory: float = 80.0,
    spot: float | None = 1.0,
    ondemand: float | None = 4.0,
    rate: float = 0.1,
    vcpus: float = 12,
    ram: float = 85,
    region: str | None = None,
) -> Offer:
    region = region if region is not None else zone.rsplit("-", 1)[0]
    return Offer(provider, region, zone, itype, gpu, count, memory, vcpus, ram, spot, ondemand, rate)


# The job of the hand computations: 10 h on one A100, a 30-minute checkpoint interval and 20 GB
# checkpoints. A 20 GB final save takes 20 / 0.25 GB/s = 80 s, more than 80% of GCP's 30 s notice,
# so each preemption redoes half an interval (900 s) on top of the restart: GCP boot 180 s +
# reloading the checkpoint 80 s. Hours lost per preemption: (900 + 180 + 80) / 3600.
BASE = """
resources:
  gpu: A100
  providers: [gcp]
  spot: true
checkpoint:
  interval: 30m
workload:
  hours: 10
  checkpoint_gb: 20
"""
LOST_H = (900 + 180 + 80) / 3600
STORAGE_PER_H = 2 * 20 * 0.020 / 730  # two 20 GB checkpoints in GCS at $0.020/GB-month


def by_hand(price: float, rate: float, hours: float = 10.0) -> float:
    wall = hours / (1 - rate * LOST_H)
    return price * wall + STORAGE_PER_H * wall


def test_expected_cost_matches_hand_arithmetic(tmp_path: Path) -> None:
    o = offer(spot=1.0, rate=0.5)
    (c,) = plan(spec(tmp_path, BASE), [o]).candidates
    wall = 10 / (1 - 0.5 * LOST_H)  # 11.9205... hours
    assert c.base_hours == pytest.approx(10.0)
    assert c.expected_hours == pytest.approx(wall)
    assert c.expected_preemptions == pytest.approx(0.5 * wall)
    assert c.breakdown["compute"] == pytest.approx(10.0)
    assert c.breakdown["restarts"] == pytest.approx(wall - 10.0)
    assert c.breakdown["storage"] == pytest.approx(STORAGE_PER_H * wall)
    assert c.breakdown["egress"] == 0.0
    assert c.expected_cost == pytest.approx(by_hand(1.0, 0.5))
    assert c.expected_cost == pytest.approx(sum(c.breakdown.values()))
    assert not c.final_save_fits
    assert c.hours_lost_per_preemption == pytest.approx(LOST_H)


@pytest.mark.parametrize("steady_price", [1.05, 1.15, 1.18, 1.19, 1.25, 1.6])
def test_pricier_steadier_offer_wins_exactly_when_cheaper_in_expectation(tmp_path: Path, steady_price: float) -> None:
    volatile = offer("us-central1-a", spot=1.00, rate=0.5)  # expected: $11.93
    steady = offer("us-central1-b", spot=steady_price, rate=0.01)
    best = plan(spec(tmp_path, BASE), [volatile, steady]).best
    assert best is not None
    steady_cost, volatile_cost = by_hand(steady_price, 0.01), by_hand(1.00, 0.5)
    # The break-even steady price is ~1.188: below it the pricier offer wins, above it the cheap one.
    assert best.offer is (steady if steady_cost < volatile_cost else volatile)
    assert best.expected_cost == pytest.approx(min(steady_cost, volatile_cost))


def test_sticker_price_alone_would_choose_wrongly(tmp_path: Path) -> None:
    volatile = offer("us-central1-a", spot=1.00, rate=0.5)
    steady = offer("us-central1-b", spot=1.15, rate=0.01)
    ranked = plan(spec(tmp_path, BASE), [volatile, steady]).candidates
    assert [c.offer.zone for c in ranked] == ["us-central1-b", "us-central1-a"]
    assert ranked[0].hourly_price > ranked[1].hourly_price


def test_final_save_within_notice_makes_preemptions_cheap(tmp_path: Path) -> None:
    # 2 GB saves in 8 s < 24 s: a preemption costs the restart (180 + 8 s) and the save (8 s), no redo.
    s = spec(tmp_path, BASE.replace("checkpoint_gb: 20", "checkpoint_gb: 2"))
    (c,) = plan(s, [offer(spot=1.0, rate=0.5)]).candidates
    lost = (180 + 8 + 8) / 3600
    assert c.final_save_fits
    assert c.expected_hours == pytest.approx(10 / (1 - 0.5 * lost))


def test_too_volatile_to_ever_finish_is_rejected(tmp_path: Path) -> None:
    # rate * hours lost >= 1: the job would never make progress.
    p = plan(spec(tmp_path, BASE), [offer(rate=1 / LOST_H + 0.01)])
    assert p.candidates == []
    assert p.rejected == {"too volatile to finish": 1}


def test_auto_considers_spot_and_on_demand(tmp_path: Path) -> None:
    s = spec(tmp_path, BASE.replace("spot: true", "spot: auto"))
    o = offer(spot=3.9, ondemand=4.0, rate=0.5)  # spot barely cheaper, but preempted often
    ranked = plan(s, [o]).candidates
    assert [c.spot for c in ranked] == [False, True]
    assert ranked[0].expected_cost == pytest.approx(4.0 * 10 + STORAGE_PER_H * 10)
    assert ranked[0].expected_preemptions == 0.0


@pytest.mark.parametrize(("mode", "expected"), [("true", [True]), ("false", [False]), ("auto", [True, False])])
def test_spot_modes(tmp_path: Path, mode: str, expected: list[bool]) -> None:
    s = spec(tmp_path, BASE.replace("spot: true", f"spot: {mode}"))
    ranked = plan(s, [offer(spot=1.0, ondemand=4.0, rate=0.01)]).candidates
    assert [c.spot for c in ranked] == expected


def test_offer_without_spot_price_is_rejected_for_spot_only(tmp_path: Path) -> None:
    p = plan(spec(tmp_path, BASE), [offer(spot=None)])
    assert p.candidates == [] and p.rejected == {"no spot price": 1}
    assert p.ondemand_baseline is not None and p.ondemand_baseline.hourly_price == 4.0


def test_filters_gpu_count_memory_cpu_ram(tmp_path: Path) -> None:
    offers = [
        offer("us-central1-a", "ok"),
        offer("us-central1-a", "t4", gpu="T4", memory=16),
        offer("us-central1-a", "two", count=2),
        offer("us-central1-a", "a100-40", memory=40),
        offer("us-central1-a", "few-cpus", vcpus=4),
        offer("us-central1-a", "small-ram", ram=16),
        offer("us-central1-a", "cpu-only", gpu=None, count=0, memory=0),
    ]
    body = BASE.replace("  gpu: A100\n", "  gpu: {name: A100, count: 1, memory: 80GB}\n  cpus: 8\n  memory: 64GB\n")
    p = plan(spec(tmp_path, body), offers)
    assert [c.offer.instance_type for c in p.candidates] == ["ok"]
    assert p.rejected == {
        "other GPU model": 2,
        "other GPU count": 1,
        "too little GPU memory": 1,
        "too few vCPUs": 1,
        "too little RAM": 1,
    }


def test_any_gpu_model_with_count(tmp_path: Path) -> None:
    body = BASE.replace("  gpu: A100\n", "  gpu: {count: 1}\n")
    offers = [offer(itype="a"), offer(itype="t4", gpu="T4", memory=16, spot=0.2), offer(itype="cpu", gpu=None, count=0)]
    p = plan(spec(tmp_path, body), offers)
    assert sorted(c.offer.instance_type for c in p.candidates) == ["a", "t4"]
    # The T4 is 0.15x an A100: 10 h of A100 work take 66.7 h there.
    t4 = next(c for c in p.candidates if c.offer.gpu == "T4")
    assert t4.base_hours == pytest.approx(10 / 0.15)


def test_provider_region_and_zone_globs(tmp_path: Path) -> None:
    offers = [
        offer("us-central1-a"),
        offer("europe-west4-a"),
        offer("", "Standard_NC24ads_A100_v4", provider="azure", region="eastus"),
        offer("us-east-1a", "p4d", provider="aws"),
    ]
    body = BASE.replace("  providers: [gcp]\n", "  providers: [gcp, azure]\n  regions: ['us-*', 'east*']\n")
    p = plan(spec(tmp_path, body), offers)
    assert sorted(c.offer.location for c in p.candidates) == ["eastus", "us-central1-a"]
    assert p.rejected == {"provider not allowed": 1, "region not allowed": 1}
    zoned = BASE.replace("  providers: [gcp]\n", "  providers: [gcp, azure]\n  zones: ['*-a']\n")
    p = plan(spec(tmp_path, zoned), offers)
    assert sorted(c.offer.location for c in p.candidates) == ["europe-west4-a", "us-central1-a"]
    assert p.rejected["zone not allowed (no zone in offer)"] == 1


def test_max_price(tmp_path: Path) -> None:
    body = BASE.replace("  spot: true\n", "  spot: auto\n  max_price: 2.5\n")
    p = plan(spec(tmp_path, body), [offer(spot=1.0, ondemand=4.0), offer("us-central1-b", spot=3.0, ondemand=4.0)])
    assert [(c.offer.zone, c.spot) for c in p.candidates] == [("us-central1-a", True)]
    assert p.rejected == {"above max price": 1}


def test_deadline_and_budget(tmp_path: Path) -> None:
    volatile = offer("us-central1-a", spot=1.00, rate=0.5)  # 11.92 h, $11.93
    steady = offer("us-central1-b", spot=1.30, rate=0.01)  # 10.03 h, $13.05
    p = plan(spec(tmp_path, BASE + "deadline: 11h\n"), [volatile, steady])
    assert [c.offer.zone for c in p.candidates] == ["us-central1-b"]
    assert [c.offer.zone for c in p.near_misses] == ["us-central1-a"]
    assert not p.near_misses[0].meets_deadline
    assert p.rejected == {"misses deadline": 1}

    p = plan(spec(tmp_path, BASE + "budget: 12\n"), [volatile, steady])
    assert [c.offer.zone for c in p.candidates] == ["us-central1-a"]
    assert p.rejected == {"over budget": 1}

    p = plan(spec(tmp_path, BASE + "budget: 5\n"), [volatile, steady])
    assert p.candidates == [] and p.rejected == {"over budget": 2}
    assert "over budget" in p.explain_empty() and "Closest" in p.explain_empty()


def test_exclusion_of_zones_in_cooldown(tmp_path: Path) -> None:
    volatile = offer("us-central1-a", spot=1.00, rate=0.5)
    steady = offer("us-central1-b", spot=1.15, rate=0.01)
    p = plan(spec(tmp_path, BASE), [volatile, steady], exclude={steady.key})
    assert [c.offer for c in p.candidates] == [volatile]
    assert p.rejected == {"in cooldown": 1}


def test_replan_after_progress_shrinks_remaining_work_and_budget(tmp_path: Path) -> None:
    o = offer(spot=1.0, rate=0.5)
    (c,) = plan(
        spec(tmp_path, BASE + "budget: 20\ndeadline: 20h\n"), [o], progress=0.5, spent=8, elapsed_hours=6
    ).candidates
    assert c.base_hours == pytest.approx(5.0)
    assert c.expected_cost == pytest.approx(by_hand(1.0, 0.5, hours=5.0))
    assert c.finish_hours == pytest.approx(6 + 5 / (1 - 0.5 * LOST_H))
    assert c.within_budget  # 8 + 5.97 <= 20
    p = plan(spec(tmp_path, BASE + "budget: 12\n"), [o], progress=0.5, spent=8)
    assert p.candidates == [] and p.rejected == {"over budget": 1}


def test_gpu_memory_estimated_from_model_params(tmp_path: Path) -> None:
    # 7B params, bf16 + AdamW: 16 bytes/param = 112 GB of states, +20% activations, +1 GB context.
    body = BASE.replace("  gpu: A100\n", "  gpu: A100:{n}\n") + "  model_params: 7B\n"
    offers = [offer(itype="80", count=1), offer(itype="2x40", count=2, memory=40), offer(itype="2x80", count=2)]
    p1 = plan(spec(tmp_path, body.format(n=1)), offers)
    assert p1.gpu_memory_needed_gb == pytest.approx(7e9 * 16 * 1.2 / 1e9 + 1)
    assert p1.candidates == []
    p2 = plan(spec(tmp_path, body.format(n=2)), offers)  # sharded over 2 GPUs: 68.2 GB each
    assert p2.gpu_memory_needed_gb == pytest.approx(7e9 * 16 * 1.2 / 1e9 / 2 + 1)
    assert [c.offer.instance_type for c in p2.candidates] == ["2x80"]


def test_hours_on_and_gpu_scaling(tmp_path: Path) -> None:
    body = BASE.replace("  gpu: A100\n", "  gpu: {count: 2}\n").replace(
        "  hours: 10\n", "  hours: 10\n  hours_on: {H100: 3}\n"
    )
    offers = [offer(itype="a100x2", count=2), offer(itype="h100x2", gpu="H100", count=2)]
    by_type = {c.offer.instance_type: c for c in plan(spec(tmp_path, body), offers).candidates}
    # Two GPUs at 90% efficiency: 1.8 GPUs' worth. H100 uses its own measured hours.
    assert by_type["a100x2"].base_hours == pytest.approx(10 / 1.8)
    assert by_type["h100x2"].base_hours == pytest.approx(3 / 1.8)


def test_egress_when_store_is_in_another_cloud(tmp_path: Path) -> None:
    body = BASE + "store: s3://bucket/jobs\n"
    body = body.replace("checkpoint_gb: 20", "checkpoint_gb: 20\n  data_gb: 50")
    (c,) = plan(spec(tmp_path, body), [offer(spot=1.0, rate=0.0)]).candidates
    # No preemption: the data comes in once from S3 ($0.09/GB out of AWS), and every checkpoint goes
    # out of GCP ($0.12/GB) every 30 min: 10 h -> 20 saves of 20 GB. S3 keeps 2 x 20 GB for 10 h.
    assert c.breakdown["egress"] == pytest.approx(50 * 0.09 + 20 * 20 * 0.12)
    assert c.breakdown["storage"] == pytest.approx(2 * 20 * 0.023 / 730 * 10)


def test_local_provider_offers_work(tmp_path: Path) -> None:
    body = BASE.replace("providers: [gcp]", "providers: [local]")
    local = offer("local-a", "sim.gpu", provider="local", region="local", spot=0.5, rate=2.0)
    (c,) = plan(spec(tmp_path, body), [local]).candidates
    # Local: 5 s boot, 30 s notice (20 GB save does not fit), no storage or egress charges.
    lost = (900 + 5 + 80) / 3600
    assert c.expected_hours == pytest.approx(10 / (1 - 2.0 * lost))
    assert c.breakdown["storage"] == 0.0 and c.breakdown["egress"] == 0.0


def test_default_runtime_assumption_is_stated(tmp_path: Path) -> None:
    p = plan(spec(tmp_path, "resources:\n  gpu: A100\n  providers: [gcp]\n"), [offer()])
    assert p.best is not None and p.best.base_hours == pytest.approx(1.0)
    assert any("assumed 1 h on one A100" in n for n in p.notes)


def test_plan_to_dict_is_json_ready(tmp_path: Path) -> None:
    import json

    p = plan(spec(tmp_path, BASE), [offer()])
    data = json.loads(json.dumps(p.to_dict()))
    assert data["candidates"][0]["key"] == "gcp/us-central1-a/a2-highgpu-1g"
    assert set(data["candidates"][0]["breakdown"]) == {"compute", "restarts", "storage", "egress"}
