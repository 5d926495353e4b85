"""Benchmark the relaunch policies on every real trace set in shared/data.

Prints the markdown results grid for docs/BENCHMARKS.md: for each trace set, a grid of jobs
(work lengths x deadline slacks x start times spread over the trace), each policy's mean
cost / on-demand, deadlines met, and gap to the offline bound.

    .venv/bin/python scripts/bench_policies.py [--data DIR] [--starts N] [--jobs 2]

Prices: a trace's own prices where it has them; otherwise the on-demand price from
aws_ondemand/ (AWS) or gpu_catalog_skypilot_format/gcp_vms.csv (GCP), and the spot price
from the AWS Spot Advisor average saving or the GCP catalog's spot price. Cost ratios only
depend on the spot/on-demand ratio and on price differences between zones.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spotrun.policies import POLICIES  # noqa: E402
from spotrun.simulate.model import JobModel, Market  # noqa: E402
from spotrun.simulate.sweep import CaseResult, bound_summary, run_grid, summarize  # noqa: E402
from spotrun.simulate.traces import ZoneTrace, load_trace  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("SPOTRUN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SLACKS = (0.1, 0.5, 1.0, math.inf)  # inf: no deadline
RESTART_OVERHEAD_H = 0.2
CHECKPOINT_INTERVAL_H = 0.5


# ----------------------------------------------------------------------------- prices


def aws_prices(data: Path, region: str, itype: str) -> tuple[float, float]:
    """(spot, on-demand) USD/h: on-demand list price, spot = on-demand x (1 - Spot Advisor saving)."""
    od = None
    with (data / "aws_ondemand/aws_accel_ondemand_prices.csv").open() as f:
        for row in csv.DictReader(f):
            if row["region"] == region and row["instance_type"] == itype:
                od = float(row["ondemand_usd_per_hour"])
    if od is None:
        raise KeyError(f"no on-demand price for {itype} in {region}")
    adv = json.loads((data / "aws_spot_advisor/spot-advisor-data_commit-2025-06-28.json").read_text())
    saving = adv["spot_advisor"][region]["Linux"][itype]["s"]
    return od * (1 - saving / 100.0), od


def gcp_prices(data: Path, zone: str, host: str, gpu: str, count: int = 1) -> tuple[float, float]:
    """(spot, on-demand) USD/h of host VM + GPUs in a GCP zone, from the SkyPilot-format catalog."""
    spot = od = 0.0
    found = 0
    with (data / "gpu_catalog_skypilot_format/gcp_vms.csv").open() as f:
        for row in csv.DictReader(f):
            if row["AvailabilityZone"] != zone:
                continue
            if row["InstanceType"] == host or (
                not row["InstanceType"]
                and row["AcceleratorName"] == gpu
                and row["AcceleratorCount"]
                and int(float(row["AcceleratorCount"])) == count
            ):
                od += float(row["Price"])
                spot += float(row["SpotPrice"])
                found += 1
    if found != 2:
        raise KeyError(f"no {host} + {gpu}x{count} price in {zone}")
    return spot, od


# ----------------------------------------------------------------------------- trace sets


@dataclass
class TraceSet:
    name: str
    describe: str
    load: Callable[[Path], list[ZoneTrace]]
    prices: Callable[[Path], tuple[float | None, float | None]] = lambda d: (None, None)
    works: tuple[float, ...] = (8.0, 24.0, 48.0)
    gap_seconds: float | None = None
    market_kw: dict = field(default_factory=dict)


def _files(data: Path, rel: str, names: list[str], nodes: int = 1) -> list[ZoneTrace]:
    out: list[ZoneTrace] = []
    for n in names:
        out.extend(load_trace(data / rel / n, nodes=nodes))
    return out


def _scaled(pair: tuple[float, float], factor: float) -> tuple[float, float]:
    return pair[0] * factor, pair[1] * factor


def _probes(data: Path) -> list[ZoneTrace]:
    """SkyNomad probes, for a job that needs 8 of the 16 probed H100s at once, priced like
    the same zone's a3-highgpu-8g (spot and on-demand) from the SkyNomad merged traces."""
    zones = load_trace(data / "skynomad/gcp_h100_spot_probes.csv", nodes=8)
    priced = {t.name: t for t in load_trace(data / "skynomad/gcp_h100_16_traces")}
    for z in zones:
        ref = priced[z.name]
        z.prices = [ref.prices[0]] * z.ticks if ref.prices else None
        z.ondemand_price = ref.ondemand_price
    return zones


def _aws_price_history(data: Path) -> list[ZoneTrace]:
    zones = [
        t
        for t in load_trace(data / "training_on_a_dime/aws_p2_p3_spot_price_history_2020.csv")
        if t.instance == "p3.2xlarge" and t.region == "us-east-1"
    ]
    od = aws_prices(data, "us-east-1", "p3.2xlarge")[1]
    for z in zones:
        z.ondemand_price = od
    return zones


def _gcp_price_history(data: Path) -> list[ZoneTrace]:
    keep = {"us-central1", "us-east1", "us-east4", "us-west1", "us-west4"}
    zones = [
        t
        for t in load_trace(data / "gcp_price_history_cyclenerd/gcp_gpu_vm_price_changes.csv")
        if t.instance == "a2-highgpu-1g" and t.name in keep
    ]
    # The last 90 days of the history: the recent market, hourly ticks.
    return [z.window(max(0, z.ticks - 90)) for z in zones]


SETS: list[TraceSet] = [
    TraceSet(
        "skypilot 1-node V100 (2022-10, 2 zones)",
        "Can't-Be-Late traces, p3.2xlarge, us-west-2a/b, 10-min ticks, 27 days",
        lambda d: _files(
            d,
            "skypilot_spot_traces/availability/1-node/aws-10-26-2022",
            ["us-west-2a_v100_1.json", "us-west-2b_v100_1.json"],
        ),
        lambda d: aws_prices(d, "us-west-2", "p3.2xlarge"),
    ),
    TraceSet(
        "skypilot 1-node 8xK80 (2022-10, 2 zones)",
        "Can't-Be-Late traces, p2.8xlarge, us-west-2a/b",
        lambda d: _files(
            d,
            "skypilot_spot_traces/availability/1-node/aws-10-26-2022",
            ["us-west-2a_k80_8.json", "us-west-2b_k80_8.json"],
        ),
        lambda d: aws_prices(d, "us-west-2", "p2.8xlarge"),
    ),
    TraceSet(
        "skypilot 16-node V100 gang (2023-08, 3 zones)",
        "16 x p3.2xlarge needed at once; us-east-2b, us-west-2a/c; 5-min ticks",
        lambda d: _files(
            d,
            "skypilot_spot_traces/availability/16-node/aws-08-27-2023",
            ["us-east-2b_v100_1.json", "us-west-2a_v100_1.json", "us-west-2c_v100_1.json"],
            nodes=16,
        ),
        lambda d: _scaled(aws_prices(d, "us-west-2", "p3.2xlarge"), 16),
        works=(4.0, 12.0, 24.0),
    ),
    TraceSet(
        "raw probes V100 (2022-11/12, 2 zones)",
        "skypilot_spot_strategy_raw 2022-11-28, p3.2xlarge us-west-2a/b (1 = launch failed)",
        lambda d: _files(
            d, "skypilot_spot_strategy_raw/2022-11-28T22-23", ["us-west-2a_v100_1.csv", "us-west-2b_v100_1.csv"]
        ),
        lambda d: aws_prices(d, "us-west-2", "p3.2xlarge"),
    ),
    TraceSet(
        "raw probes 1xK80 (2022-12, 2 zones)",
        "skypilot_spot_strategy_raw 2022-12-13, p2.xlarge us-west-2a/b",
        lambda d: _files(
            d, "skypilot_spot_strategy_raw/2022-12-13T19-23", ["us-west-2a_k80_1.csv", "us-west-2b_k80_1.csv"]
        ),
        lambda d: aws_prices(d, "us-west-2", "p2.xlarge"),
    ),
    TraceSet(
        "SkyNomad H100 (2025-10, 13 zones)",
        "GCP a3-highgpu-8g, 13 zones in 8 regions, zone prices from the traces, 10-min ticks",
        lambda d: load_trace(d / "skynomad/gcp_h100_16_traces"),
    ),
    TraceSet(
        "SkyNomad probes, 8 of 16 H100 (2025-10, 13 zones)",
        "gcp_h100_spot_probes.csv, available when >= 8 of 16 launched",
        _probes,
    ),
    TraceSet(
        "Bamboo p3 cluster, 24 nodes",
        "p3-trace.csv add/remove events, available when >= 24 nodes alive; 11 h",
        lambda d: load_trace(d / "bamboo_traces/p3-trace.csv", nodes=24),
        lambda d: _scaled(aws_prices(d, "us-east-1", "p3.2xlarge"), 24),
        works=(2.0, 4.0),
    ),
    TraceSet(
        "Bamboo g4dn cluster, 10 nodes",
        "g4dn-trace.csv, available when >= 10 nodes alive; 10.8 h",
        lambda d: load_trace(d / "bamboo_traces/g4dn-trace.csv", nodes=10),
        lambda d: _scaled(aws_prices(d, "us-east-1", "g4dn.xlarge"), 10),
        works=(2.0, 4.0),
    ),
    TraceSet(
        "Bamboo GCP A100 + V100 (2021-12)",
        "gcloud a100x1 us-east1-b (>= 57 of 64) and v100x1 us-east1-c (>= 77 of 80), per-VM prices",
        lambda d: (
            load_trace(d / "bamboo_traces/gcloud/a100x1-east1b.csv", nodes=57)
            + load_trace(d / "bamboo_traces/gcloud/v100x1-east1c.csv", nodes=77)
        ),
        works=(4.0, 8.0),
    ),
    TraceSet(
        "Bamboo AWS g4dn + p2 (2020-11)",
        "doc_data g4dn.xlarge us-east-1c (>= 12) and p2.xlarge 3-day series (>= 16)",
        lambda d: (
            load_trace(
                d / "bamboo_traces/doc_data/"
                "aws-spot-instances-g4dn-xlarge-us-east-1c-2020-11-20-1930-to-2020-11-21-2200.csv",
                nodes=12,
            )
            + load_trace(
                d / "bamboo_traces/doc_data/aws-spot-instances-p2-xlarge-2020-11-20-to-2020-11-23.csv", nodes=16
            )
        ),
        works=(4.0, 8.0),
    ),
    TraceSet(
        "AWS spot prices p3.2xlarge (2020, us-east-1 zones)",
        "training_on_a_dime price history: always available, price per zone changes; 10-min ticks",
        _aws_price_history,
        gap_seconds=600.0,
    ),
    TraceSet(
        "GCP spot prices a2-highgpu-1g (2026, 5 US regions)",
        "Cyclenerd price history, last 90 days, daily price steps on 10-min ticks",
        _gcp_price_history,
        gap_seconds=600.0,
    ),
]


def _set_prices(ts: TraceSet, data: Path, zones: list[ZoneTrace]) -> tuple[float | None, float | None]:
    if ts.name.startswith("Bamboo GCP"):
        a = gcp_prices(data, "us-east1-b", "a2-highgpu-1g", "A100")
        v = gcp_prices(data, "us-east1-c", "n1-standard-8", "V100")
        for z, (sp, od) in zip(zones, (a, v), strict=True):
            z.prices, z.ondemand_price = [sp] * z.ticks, od
        return None, None
    if ts.name.startswith("Bamboo AWS"):
        g = _scaled(aws_prices(data, "us-east-1", "g4dn.xlarge"), 12)
        p = _scaled(aws_prices(data, "us-east-1", "p2.xlarge"), 16)
        for z, (sp, od) in zip(zones, (g, p), strict=True):
            z.prices, z.ondemand_price = [sp] * z.ticks, od
        return None, None
    return ts.prices(data)


def bench_set(args: tuple[int, str, int, bool]) -> tuple[int, list[CaseResult], float]:
    idx, data_s, starts, notice_save = args
    data = Path(data_s)
    ts = SETS[idx]
    t0 = time.perf_counter()
    zones = ts.load(data)
    spot, od = _set_prices(ts, data, zones)
    market = Market.from_traces(zones, spot_price=spot, ondemand_price=od, gap_seconds=ts.gap_seconds)
    base = JobModel(
        work_h=1.0,
        restart_overhead_h=RESTART_OVERHEAD_H,
        checkpoint_interval_h=CHECKPOINT_INTERVAL_H,
        notice_save=notice_save,
    )
    cases = run_grid(market, base, ts.works, SLACKS, list(POLICIES), starts=starts)
    return idx, cases, time.perf_counter() - t0


def _fmt_ratio(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _slack_label(s: float) -> str:
    return "no deadline" if math.isinf(s) else f"{round(s * 100)}%"


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _cells(cases: list[CaseResult], pols: list[str], bold: bool = False) -> list[str]:
    summ = summarize(cases, pols)
    out = []
    for p in pols:
        s = summ[p]
        cell = f"{_fmt_ratio(s.mean_cost_ratio)} · {s.deadlines_met}/{s.cases} · {s.mean_gap * 100:+.1f}%"
        out.append(f"**{cell}**" if bold else cell)
    return out


def render(results: dict[int, list[CaseResult]], timings: dict[int, float], notice_save: bool) -> str:
    pols = list(POLICIES)
    head = "| {} | jobs | bound | " + " | ".join(pols) + " |"
    rule = "|---|---|---|" + "---|" * len(pols)
    lines = [
        f"Jobs per trace set: the work lengths shown x deadline slack "
        f"{', '.join(_slack_label(s) for s in SLACKS)} (deadline = work x (1 + slack)) x start times "
        f"spread over the trace; each policy may look at the 24 h of trace before its start. Restart "
        f"overhead {RESTART_OVERHEAD_H} h per launch (billed); "
        + (
            "the notice-time save works (a preemption loses no work)."
            if notice_save
            else f"no notice-time save: a preemption loses the work since the last checkpoint "
            f"(every {CHECKPOINT_INTERVAL_H} h)."
        ),
        "",
        "Cells: mean cost ÷ on-demand · deadlines met / jobs · mean gap to the offline bound "
        "(cost ÷ bound − 1; negative only for a policy that missed deadlines the bound had to meet).",
        "",
        head.format("trace set"),
        rule,
    ]
    all_cases: list[CaseResult] = []
    for idx in sorted(results):
        cases = results[idx]
        all_cases.extend(cases)
        b, _ = bound_summary(cases)
        works = "/".join(f"{w:g}" for w in SETS[idx].works)
        lines.append(
            f"| {SETS[idx].name} (work {works} h) | {len(cases)} | {_fmt_ratio(b)} | "
            + " | ".join(_cells(cases, pols))
            + " |"
        )
    b, nb = bound_summary(all_cases)
    lines.append(
        f"| **all sets** | {len(all_cases)} | {_fmt_ratio(b)} | "
        + " | ".join(_cells(all_cases, pols, bold=True))
        + " |"
    )
    lines += ["", "By deadline slack, all sets together:", "", head.format("slack"), rule]
    for sl in SLACKS:
        sub = [c for c in all_cases if (math.isinf(sl) and math.isinf(c.slack)) or abs(c.slack - sl) < 1e-6]
        if sub:
            bs, _ = bound_summary(sub)
            lines.append(
                f"| {_slack_label(sl)} | {len(sub)} | {_fmt_ratio(bs)} | " + " | ".join(_cells(sub, pols)) + " |"
            )
    summ = summarize(all_cases, pols)
    sp, gr, fo = summ["spotrun"], summ["greedy"], summ["failover"]
    fo_met = [c for c in all_cases if c.results["failover"].deadline_met]
    no_dl = [c for c in all_cases if c.results["spotrun"].deadline_h is None]

    def mean_on(cases: list[CaseResult], p: str) -> float:
        return _mean([c.results[p].cost_ratio for c in cases])

    def penalized(p: str) -> float:
        """A deadline a user set is a requirement: a missed one costs at least the on-demand run."""
        return _mean(
            [
                c.results[p].cost_ratio if c.results[p].deadline_met else max(1.0, c.results[p].cost_ratio)
                for c in all_cases
            ]
        )

    lines += [
        "",
        f"- spotrun missed **{sp.missed_where_bound_met} of {nb}** deadlines the offline bound meets "
        f"(greedy {gr.missed_where_bound_met}, uniform-progress {summ['uniform-progress'].missed_where_bound_met}, "
        f"failover {fo.missed_where_bound_met}).",
        f"- Mean cost ÷ on-demand over all {len(all_cases)} jobs: spotrun **{sp.mean_cost_ratio:.3f}**, greedy "
        f"{gr.mean_cost_ratio:.3f}, failover {fo.mean_cost_ratio:.3f} (it misses {fo.cases - fo.deadlines_met} "
        f"deadlines), uniform-progress {summ['uniform-progress'].mean_cost_ratio:.3f}, offline bound {b:.3f}.",
        f"- spotrun's mean gap to the offline bound: **{sp.mean_gap * 100:.1f}%** (greedy {gr.mean_gap * 100:.1f}%, "
        f"uniform-progress {summ['uniform-progress'].mean_gap * 100:.1f}%).",
        "- Counting a missed deadline at what meeting it would have cost (the job on on-demand from the start, "
        f"cost ÷ on-demand at least 1): spotrun **{penalized('spotrun'):.3f}**, greedy {penalized('greedy'):.3f}, "
        f"failover {penalized('failover'):.3f}, uniform-progress {penalized('uniform-progress'):.3f}.",
        f"- On the {len(fo_met)} jobs where failover did meet its deadline: spotrun {mean_on(fo_met, 'spotrun'):.3f}, "
        f"failover {mean_on(fo_met, 'failover'):.3f}, greedy {mean_on(fo_met, 'greedy'):.3f}.",
        f"- Without a deadline ({len(no_dl)} jobs, every policy finishes): spotrun "
        f"{mean_on(no_dl, 'spotrun'):.3f}, failover {mean_on(no_dl, 'failover'):.3f}, greedy "
        f"{mean_on(no_dl, 'greedy'):.3f}, bound {bound_summary(no_dl)[0]:.3f}.",
        "",
        "Wall time per set (s): " + ", ".join(f"{timings[i]:.1f}" for i in sorted(timings)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--starts", type=int, default=6, help="start times per (work, slack)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--no-notice-save", action="store_true", help="preemptions lose the work since the last checkpoint")
    ap.add_argument("--only", type=str, default=None, help="run only sets whose name contains this")
    a = ap.parse_args(argv)
    idxs = [i for i, s in enumerate(SETS) if a.only is None or a.only.lower() in s.name.lower()]
    work = [(i, str(a.data), a.starts, not a.no_notice_save) for i in idxs]
    results: dict[int, list[CaseResult]] = {}
    timings: dict[int, float] = {}
    t0 = time.perf_counter()
    if a.jobs > 1:
        with ProcessPoolExecutor(max_workers=a.jobs) as ex:
            for idx, cases, dt in ex.map(bench_set, work):
                results[idx], timings[idx] = cases, dt
    else:
        for w in work:
            idx, cases, dt = bench_set(w)
            results[idx], timings[idx] = cases, dt
    print(render(results, timings, not a.no_notice_save))
    print(f"\nTotal wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
