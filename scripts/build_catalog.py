"""Build the offline catalog bundled with spotrun from the public data in shared/data.

    python scripts/build_catalog.py [--data /work/shared/data] [--out spotrun/catalog/data]

Writes `offers.csv.gz` (one row per provider/region/zone/instance type, GPU VMs only) and
`meta.json` (counts, dates, the interruption calibration). The data folder's PROVENANCE.md says
where each input comes from; spotrun/catalog/data/SOURCES.md summarizes what this script takes
from it. Standard library only, so it runs anywhere spotrun does.

What each provider's rows are made of:

* AWS: on-demand Linux USD/h per region (aws_ondemand/aws_accel_ondemand_prices.csv, region rows
  only) x GPU specs from DescribeInstanceTypes (aws_accel_instance_specs.csv). Spot price =
  on-demand x (1 - savings%/100) from the Spot Advisor feed of that region, capped at on-demand
  (AWS never bills spot above it). The feed is per region, so AWS rows have `zone` "" (any zone
  of the region); `spotrun catalog refresh` replaces them with per-zone rows.
* GCP: price of a GPU VM = host row + accelerator row in the same zone (gcp_vms.csv), for the
  fixed-GPU families (a2/a3/a4/g2) and for N1 hosts + T4/V100/P100/P4 (a ladder of n1-standard and
  n1-highmem sizes within GCP's vCPU limit per GPU count).
* Azure: the GPU rows of azure_vms_gpu_only.csv, per region (Azure has no zone in price data).
  Rows whose `Generation` is `V1,V2` have 11 comma-separated fields: fields 10+ are Generation.
  Fractional-GPU sizes (NVadsA10 v5 slices, NVv4 MI25 slices) are left out; a SpotPrice equal to
  Price (all H200 rows) means "no spot discount published" and is stored as no spot price.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import io
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spotrun.catalog.interruption import (  # noqa: E402
    AWS_TOP_BUCKET_RATE,
    GENERIC_PRIOR_RATE,
    advisor_bucket_rate,
    availability_trace_stats,
    cluster_removal_rate,
    rate_from_counts,
)
from spotrun.catalog.model import Offer  # noqa: E402
from spotrun.catalog.snapshot import write_offers  # noqa: E402
from spotrun.gpus import gpu_model, nominal_memory_gb, parse_gpu  # noqa: E402

ADVISOR_FILE = "aws_spot_advisor/spot-advisor-data_commit-2025-06-28.json"
ADVISOR_DATE = "2025-06-28"
GCP_AZURE_DATE = "2026-05-20"
ARM_FAMILIES = {"g5g"}  # Graviton hosts: x86 training images and wheels do not run there


# --------------------------------------------------------------------------- traces


def aws_trace_anchor(data: Path) -> tuple[int, float]:
    """(transitions, available hours) pooled over the AWS one-GPU probe logs (1 = launch failed)."""
    transitions = 0
    hours = 0.0
    for path in sorted((data / "skypilot_spot_strategy_raw").glob("*/*_1.csv")):
        fails = [int(row[2]) for row in csv.reader(path.open())]
        t, h, _ = availability_trace_stats(fails, 600.0)
        transitions += t
        hours += h
    return transitions, hours


def gcp_h100_zone_rates(data: Path) -> dict[str, tuple[float, float, int, float]]:
    """zone -> (rate, availability, transitions, hours up) from SkyNomad's 13 GCP H100 traces."""
    out = {}
    for path in sorted((data / "skynomad" / "gcp_h100_16_traces").glob("*_h100_16.json")):
        doc = json.loads(path.read_text())
        meta = doc["metadata"]
        gap = meta.get("gap_filled") or {}
        skip = range(gap.get("gap_start_index", 0), gap.get("gap_end_index", -1) + 1)
        t, h, avail = availability_trace_stats(doc["data"], float(meta["gap_seconds"]), skip)
        rate = rate_from_counts(t, h)
        if rate is not None:
            out[meta["zone"]] = (rate, avail, t, h)
    return out


def bamboo_gcp_rate(path: Path) -> tuple[float, int, float]:
    samples = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        day, clock, alive = (x.strip() for x in line.split(","))
        ts = dt.datetime.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M:%S").timestamp()
        samples.append((ts, int(alive)))
    removed, inst_hours = cluster_removal_rate(samples)
    return removed / inst_hours, removed, inst_hours


# --------------------------------------------------------------------------- AWS


def aws_offers(data: Path) -> Iterator[Offer]:
    specs = {r["instance_type"]: r for r in csv.DictReader((data / "aws_ondemand/aws_accel_instance_specs.csv").open())}
    advisor = json.loads((data / ADVISOR_FILE).read_text())["spot_advisor"]
    for row in csv.DictReader((data / "aws_ondemand/aws_accel_ondemand_prices.csv").open()):
        if row["location_type"] != "region":
            continue  # Local/Wavelength Zones: no Spot Advisor data, rarely GPU capacity
        spec = specs.get(row["instance_type"])
        if spec is None or spec["accelerator_kind"] != "gpu" or spec["family"] in ARM_FAMILIES:
            continue
        gpu = gpu_model(spec["gpu_name"])
        count = float(spec["gpu_count"])
        if gpu is None or not gpu.trainable or count < 1:
            continue
        od = float(row["ondemand_usd_per_hour"])
        entry = advisor.get(row["region"], {}).get("Linux", {}).get(row["instance_type"])
        if entry:
            spot = round(min(od, od * (1 - entry["s"] / 100.0)), 5)
            rate = advisor_bucket_rate(int(entry["r"]))
            source = f"measured:aws-spot-advisor-{ADVISOR_DATE}"
            observed = min(row["as_of"], ADVISOR_DATE)
        else:
            spot, rate, source, observed = None, GENERIC_PRIOR_RATE, "prior", row["as_of"]
        yield Offer(
            provider="aws",
            region=row["region"],
            zone="",
            instance_type=row["instance_type"],
            gpu=gpu.name,
            gpu_count=int(count),
            gpu_memory_gb=nominal_memory_gb(gpu.name, float(spec["gpu_memory_gib"])),
            vcpus=float(spec["vcpus"]),
            memory_gb=round(float(spec["memory_gib"]) * 1.073741824, 2),
            spot_price=spot,
            ondemand_price=od,
            interruption_rate=round(rate, 5),
            interruption_source=source,
            observed=observed,
        )


# --------------------------------------------------------------------------- GCP


# Fixed-GPU host families: host type -> (GCP accelerator label, GPU count).
def _gcp_fixed_host(instance_type: str) -> tuple[str, int] | None:
    parts = instance_type.split("-")
    if instance_type.endswith("-nolssd"):
        return None  # same VM without local SSD: one row per VM is enough
    family = "-".join(parts[:2])
    if family in ("a2-highgpu", "a2-megagpu", "a2-ultragpu", "a3-highgpu", "a3-edgegpu", "a3-megagpu"):
        count = int(parts[2].rstrip("g"))
        label = {
            "a2-highgpu": "A100",
            "a2-megagpu": "A100",
            "a2-ultragpu": "A100-80GB",
            "a3-highgpu": "H100",
            "a3-edgegpu": "H100",
            "a3-megagpu": "H100-MEGA",
        }[family]
        return label, count
    if family == "a3-ultragpu":
        return "H200", int(parts[2].rstrip("g"))
    if family == "a4-highgpu":
        return "B200", int(parts[2].rstrip("g"))
    if family == "g2-standard":
        vcpus = int(parts[2])
        return "L4", {24: 2, 48: 4, 96: 8}.get(vcpus, 1)
    return None


# N1 + attached GPU: the most vCPUs GCP allows per GPU count (cloud.google.com/compute/docs/gpus).
N1_MAX_VCPUS = {
    "T4": {1: 48, 2: 48, 4: 96},
    "V100": {1: 12, 2: 24, 4: 48, 8: 96},
    "P100": {1: 16, 2: 32, 4: 64},
    "P4": {1: 24, 2: 48, 4: 96},
}
N1_SIZES = (4, 8, 16, 32, 64, 96)


def gcp_offers(data: Path, measured: dict[str, tuple[float, float, int, float]], a100: float, v100: float):
    hosts: dict[tuple[str, str], dict] = {}
    accels: dict[tuple[str, str, int], dict] = {}
    for row in csv.DictReader((data / "gpu_catalog_skypilot_format/gcp_vms.csv").open()):
        if row["InstanceType"]:
            hosts[(row["AvailabilityZone"], row["InstanceType"])] = row
        elif row["AcceleratorName"] and not row["AcceleratorName"].startswith("tpu"):
            accels[(row["AvailabilityZone"], row["AcceleratorName"], int(float(row["AcceleratorCount"])))] = row
    h100_pooled = sum(m[2] for m in measured.values()) / sum(m[3] for m in measured.values())

    def interruption(gpu: str, label: str, zone: str, host: str) -> tuple[float, str, float | None]:
        if gpu == "H100" and zone in measured:
            rate, avail, _, _ = measured[zone]
            if host.startswith("a3-highgpu"):
                return rate, "measured:skynomad-gcp-h100-2025-10", avail
            return rate, "prior:skynomad-gcp-h100-same-zone", avail
        if gpu == "H100":
            return h100_pooled, "prior:skynomad-gcp-h100-pooled", None
        if gpu == "A100":
            if zone == "us-east1-b" and label == "A100":
                return a100, "measured:bamboo-gcp-a100-2021-12", None
            return a100, "prior:bamboo-gcp-a100", None
        if gpu == "V100":
            if zone == "us-east1-c":
                return v100, "measured:bamboo-gcp-v100-2021-12", None
            return v100, "prior:bamboo-gcp-v100", None
        return GENERIC_PRIOR_RATE, "prior", None

    def make(zone: str, host_row: dict, acc_row: dict, label: str, count: int) -> Offer | None:
        name, mem = parse_gpu(label)
        gpu = gpu_model(name)
        if gpu is None:
            return None
        mem_mib = _gpuinfo_mib(acc_row["GpuInfo"])
        memory_gb = nominal_memory_gb(gpu.name, mem_mib / 1024 if mem_mib else mem)
        od = _price(host_row["Price"]) + _price(acc_row["Price"])
        spot_h, spot_a = _price(host_row["SpotPrice"]), _price(acc_row["SpotPrice"])
        spot = round(spot_h + spot_a, 5) if not (math.isnan(spot_h) or math.isnan(spot_a)) else None
        rate, source, avail = interruption(gpu.name, label, zone, host_row["InstanceType"])
        return Offer(
            provider="gcp",
            region=host_row["Region"],
            zone=zone,
            instance_type=host_row["InstanceType"],
            gpu=gpu.name,
            gpu_count=count,
            gpu_memory_gb=memory_gb,
            vcpus=float(host_row["vCPUs"]),
            memory_gb=round(float(host_row["MemoryGiB"]) * 1.073741824, 2),
            spot_price=spot,
            ondemand_price=round(od, 5),
            interruption_rate=round(rate, 5),
            interruption_source=source,
            observed=GCP_AZURE_DATE,
            availability=round(avail, 4) if avail is not None else None,
        )

    for (zone, itype), host in sorted(hosts.items()):
        fixed = _gcp_fixed_host(itype)
        if fixed is None:
            continue
        label, count = fixed
        acc = accels.get((zone, label, count))
        if acc is None:
            continue
        offer = make(zone, host, acc, label, count)
        if offer:
            yield offer
    for (zone, label, count), acc in sorted(accels.items()):
        limits = N1_MAX_VCPUS.get(label)
        if not limits or count not in limits:
            continue
        for family in ("n1-standard", "n1-highmem"):
            for size in N1_SIZES:
                host = hosts.get((zone, f"{family}-{size}"))
                if host is None or size > limits[count]:
                    continue
                offer = make(zone, host, acc, label, count)
                if offer:
                    yield offer


def _gpuinfo_mib(text: str) -> float | None:
    marker = "'SizeInMiB': "
    if marker not in text:
        return None
    return float(text.split(marker, 1)[1].split("}", 1)[0])


def _price(text: str) -> float:
    return float(text) if text else math.nan


# --------------------------------------------------------------------------- Azure

# Memory per GPU where Azure's label does not say it (Azure VM size docs).
AZURE_MEMORY_GB = {
    "_H100_v5": 80.0,  # ND H100 v5: H100 SXM 80 GB
    "NC40ads_H100_v5": 94.0,  # NC H100 v5: H100 NVL 94 GB
    "NC80adis_H100_v5": 94.0,
    "NCC40ads_H100_v5": 94.0,
    "ND96asr_v4": 40.0,  # ND A100 v4: A100 40 GB
}


def azure_offers(data: Path) -> Iterator[Offer]:
    path = data / "gpu_catalog_skypilot_format/azure_vms_gpu_only.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    for line in lines[1:]:
        fields = next(csv.reader(io.StringIO(line)))
        # The `V1,V2` quirk: Generation is unquoted, so it spills into an 11th field.
        row = dict(zip(header, fields[: len(header) - 1] + [",".join(fields[len(header) - 1 :])], strict=True))
        name, mem = parse_gpu(row["AcceleratorName"])
        gpu = gpu_model(name)
        count = float(row["AcceleratorCount"])
        if gpu is None or not gpu.trainable or count < 1 or count != int(count):
            continue
        itype = row["InstanceType"]
        memory = mem
        for suffix, gb in AZURE_MEMORY_GB.items():
            if itype.endswith(suffix) or itype == f"Standard_{suffix}":
                memory = gb
        od = _price(row["Price"])
        spot = _price(row["SpotPrice"])
        yield Offer(
            provider="azure",
            region=row["Region"],
            zone="",
            instance_type=itype,
            gpu=gpu.name,
            gpu_count=int(count),
            gpu_memory_gb=nominal_memory_gb(gpu.name, memory),
            vcpus=float(row["vCPUs"]),
            memory_gb=round(float(row["MemoryGiB"]) * 1.073741824, 2),
            spot_price=None if math.isnan(spot) or spot >= od else spot,
            ondemand_price=None if math.isnan(od) else od,
            interruption_rate=GENERIC_PRIOR_RATE,
            interruption_source="prior",
            observed=GCP_AZURE_DATE,
        )


# --------------------------------------------------------------------------- main


def build(data: Path) -> tuple[list[Offer], dict]:
    anchor_t, anchor_h = aws_trace_anchor(data)
    if abs(anchor_t / anchor_h - AWS_TOP_BUCKET_RATE) > 1e-9:
        raise SystemExit(
            f"AWS calibration drifted: traces give {anchor_t}/{anchor_h:.1f} h, "
            f"spotrun.catalog.interruption says {AWS_TOP_BUCKET_RATE:.5f}; update the constant"
        )
    measured = gcp_h100_zone_rates(data)
    a100, a100_n, a100_h = bamboo_gcp_rate(data / "bamboo_traces/gcloud/a100x1-east1b.csv")
    v100, v100_n, v100_h = bamboo_gcp_rate(data / "bamboo_traces/gcloud/v100x1-east1c.csv")
    offers = [*aws_offers(data), *gcp_offers(data, measured, a100, v100), *azure_offers(data)]
    offers.sort(key=lambda o: (o.provider, o.region, o.zone, o.instance_type))
    counts: dict[str, int] = defaultdict(int)
    for o in offers:
        counts[o.provider] += 1
    meta = {
        "built": dt.date.today().isoformat(),
        "rows": len(offers),
        "rows_by_provider": dict(counts),
        "observed": {
            "aws_ondemand": "2026-01-21 (vantage) / 2026-07-20 (Karpenter)",
            "aws_spot_advisor": ADVISOR_DATE,
            "gcp": GCP_AZURE_DATE,
            "azure": GCP_AZURE_DATE,
        },
        "interruption": {
            "aws_top_bucket_rate_per_h": AWS_TOP_BUCKET_RATE,
            "aws_anchor": {"transitions": anchor_t, "available_hours": anchor_h},
            "gcp_h100_zones": {z: {"rate": r, "availability": a} for z, (r, a, _, _) in sorted(measured.items())},
            "gcp_a100_us_east1_b": {"rate": a100, "removed": a100_n, "instance_hours": a100_h},
            "gcp_v100_us_east1_c": {"rate": v100, "removed": v100_n, "instance_hours": v100_h},
            "generic_prior_per_h": GENERIC_PRIOR_RATE,
        },
    }
    return offers, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "spotrun" / "catalog" / "data")
    args = parser.parse_args(argv)
    offers, meta = build(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    # mtime=0: rebuilding from the same data gives the same bytes (no spurious diffs).
    with gzip.GzipFile(args.out / "offers.csv.gz", "wb", mtime=0) as raw:
        with io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
            write_offers(fh, offers)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(offers)} offers to {args.out}: {meta['rows_by_provider']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
