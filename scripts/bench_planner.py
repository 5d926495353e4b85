"""Benchmark: catalog load + a full `plan` over every offer, beside a bare interpreter start.

    python scripts/bench_planner.py [--repeats N]

Prints a markdown section (for `make bench`). Three measurements, medians over N repeats:

1. Fresh processes: `python -c pass` against `python -c <load the catalog and plan once>`. The
   difference is what the catalog and planner add to a `spotrun plan` run (budget: well under
   100 ms). The spec is a plain namespace here, so pydantic's import is not counted.
2. In process: a catalog load as a new process does it (from the parsed copy kept under
   SPOTRUN_HOME), and the first load ever (parsing the bundled gzip'd CSV).
3. In process: `plan` over every offer, for a typical spec (one A100, spot or on-demand, all three
   clouds) and for the worst case (no GPU constraint, so every offer yields two candidates).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLAN_ONCE = """
from types import SimpleNamespace as N
from spotrun.catalog import load_offers
from spotrun.planner import plan
spec = N(resources=N(gpu=N(name="A100", count=1), spot="auto", providers=["aws", "gcp", "azure"]),
         workload=N(hours=10.0))
assert plan(spec, load_offers()).candidates
"""


def _spec(gpu: bool) -> SimpleNamespace:
    request = SimpleNamespace(name="A100", count=1) if gpu else None
    return SimpleNamespace(
        resources=SimpleNamespace(gpu=request, spot="auto", providers=["aws", "gcp", "azure"]),
        checkpoint=SimpleNamespace(interval=1800),
        workload=SimpleNamespace(hours=10.0, checkpoint_gb=5.0, data_gb=20.0),
    )


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


def _process_ms(code: str, repeats: int) -> float:
    return _median_ms(lambda: subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT), repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="catalog + planner benchmark")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    n = max(3, args.repeats)

    bare = _process_ms("pass", n)
    planned = _process_ms(PLAN_ONCE, n)

    import spotrun.catalog as catalog
    from spotrun.planner import plan

    def cold_load() -> object:
        catalog._parsed.clear()  # drop the per-process memo: measure the parse
        return catalog.load_offers()

    from spotrun.catalog.snapshot import read_file

    load_ms = _median_ms(cold_load, n)
    parse_ms = _median_ms(lambda: read_file(catalog.BUNDLED), n)
    offers = catalog.load_offers()
    typical, worst = _spec(gpu=True), _spec(gpu=False)
    typical_ms = _median_ms(lambda: plan(typical, offers), n)
    worst_ms = _median_ms(lambda: plan(worst, offers), n)
    n_typical = len(plan(typical, offers).candidates)
    n_worst = len(plan(worst, offers).candidates)

    print("## Catalog load + planner\n")
    print(f"{len(offers)} offers in the bundled catalog; medians of {n} runs; Python {sys.version.split()[0]}.\n")
    print("| measurement | median |")
    print("|---|---:|")
    print(f"| `python -c pass` (interpreter start, baseline) | {bare:.1f} ms |")
    print(f"| `python -c` import + load catalog + plan (A100, all clouds) | {planned:.1f} ms |")
    print(f"| **added beyond interpreter start** | **{planned - bare:.1f} ms** |")
    print(f"| catalog load in a new process (from the parsed copy in SPOTRUN_HOME) | {load_ms:.1f} ms |")
    print(f"| catalog load, first ever (parsing the bundled CSV) | {parse_ms:.1f} ms |")
    print(f"| plan over every offer: one A100, spot or on-demand ({n_typical} candidates) | {typical_ms:.2f} ms |")
    print(f"| plan over every offer: any instance, spot or on-demand ({n_worst} candidates) | {worst_ms:.2f} ms |")
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
