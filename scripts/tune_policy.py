"""Tune the `spotrun` policy's constants on the TUNING half of shared/data only.

Runs the tuning grid of scripts/bench_policies.py (traces collected before 2023) for each
candidate setting and prints, per setting, the mean cost ÷ offline bound, the worst job, the
missed deadlines and how many (work, slack, overhead) cells are cheaper than greedy. The
reporting half is never loaded here.

    .venv/bin/python scripts/tune_policy.py [--starts 4] [--jobs 2] [--price-spread 0.1] [--cells] \
        'backoff_h=0.5,retry_h=1' ...
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_policies as bp  # noqa: E402

from spotrun.policies import make_policy  # noqa: E402
from spotrun.policies.spotrun_policy import SpotrunPolicy  # noqa: E402
from spotrun.simulate.engine import run  # noqa: E402
from spotrun.simulate.model import Market  # noqa: E402


def parse(setting: str) -> dict[str, float]:
    out = {}
    for part in filter(None, setting.split(",")):
        k, _, v = part.partition("=")
        out[k.strip()] = float(v)
    return out


def spread_prices(market: Market, spread: float) -> None:
    """Make the zones' spot prices differ: zone i of n pays ``1 + spread * i / (n - 1)`` times its
    own price (on-demand unchanged). The tuning traces' zones mostly share one price; this checks
    a price-dependent rule on them without looking at the reporting set."""
    n = len(market.zones)
    if spread <= 0 or n < 2:
        return
    for i in range(n):
        f = 1.0 + spread * i / (n - 1)
        market.spot_price[i] = [p * f for p in market.spot_price[i]]


def one_set(args: tuple[int, str, int, float, list[str], float]) -> list[tuple]:
    idx, data_s, starts, oh, settings, spread = args
    ts = bp.SETS[idx]
    assert ts.era == "tuning", "never tune on the reporting set"
    market = bp.set_market(ts, Path(data_s))
    spread_prices(market, spread)
    rows = []
    for w, sl, job, win, b in bp.bounded_jobs(market, ts, oh, starts):
        g = run(make_policy("greedy"), win, job)
        res = [run(SpotrunPolicy(**parse(s)), win, job) for s in settings]
        rows.append((idx, oh, w, sl, g.cost / b.cost, [(r.cost / b.cost, r.deadline_met) for r in res]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("settings", nargs="*", default=[""])
    ap.add_argument("--data", type=Path, default=bp.DEFAULT_DATA)
    ap.add_argument("--starts", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--price-spread", type=float, default=0.0, help="zone i of n: spot price x (1 + s*i/(n-1))")
    ap.add_argument("--cells", action="store_true", help="also print every (overhead, work, slack) cell")
    a = ap.parse_args()
    gap_h = bp.median_gap_h(a.data, "tuning")
    work = [
        (i, str(a.data), a.starts, m * gap_h, a.settings, a.price_spread)
        for m in bp.OVERHEAD_MULTIPLES
        for i, ts in enumerate(bp.SETS)
        if ts.era == "tuning"
    ]
    rows = []
    with ProcessPoolExecutor(max_workers=a.jobs) as ex:
        for r in ex.map(one_set, work):
            rows.extend(r)
    print(f"greedy: mean {statistics.fmean(r[4] for r in rows):.4f} worst {max(r[4] for r in rows):.3f}")
    for k, s in enumerate(a.settings):
        vals = [r[5][k][0] for r in rows]
        missed = sum(1 for r in rows if not r[5][k][1])
        cells: dict[tuple, list] = {}
        for r in rows:
            cells.setdefault((r[1], r[2], r[3]), []).append((r[5][k][0], r[4]))
        better = sum(1 for v in cells.values() if statistics.fmean(x for x, _ in v) < statistics.fmean(y for _, y in v))
        print(
            f"{s or 'defaults'}: mean {statistics.fmean(vals):.4f} worst {max(vals):.3f} missed {missed} "
            f"cells cheaper than greedy {better}/{len(cells)}"
        )
    if a.cells:
        print("cells (overhead min, work h, slack): greedy mean | each setting's mean (worst)")
        by: dict[tuple, list] = {}
        for r in rows:
            by.setdefault((r[1], r[2], r[3]), []).append(r)
        for (oh, w, sl), rs in sorted(by.items()):
            parts = [
                f"{statistics.fmean(r[5][k][0] for r in rs):.3f} ({max(r[5][k][0] for r in rs):.2f})"
                for k in range(len(a.settings))
            ]
            print(f"  {oh * 60:4.0f} {w:4g} {sl:4g}: {statistics.fmean(r[4] for r in rs):.3f} | " + " | ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
