"""`make bench`: run every benchmark and write docs/BENCHMARKS.md.

Each `scripts/bench_*.py` prints a markdown section on stdout. Sections are run one after the
other (never in parallel: they would skew each other on a 2-core machine) and written together
with the machine they ran on, so every ratio in the file was measured in one run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["bench_cli.py", "bench_planner.py", "bench_checkpoint.py", "bench_policies.py", "policy_headroom.py"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    only = sys.argv[1:]
    parts = [
        "# Benchmarks",
        "",
        f"Produced by `make bench` (`python scripts/bench.py`) on {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}. "
        "Medians over repeats; every ratio compares two things measured in the same run.",
        "",
    ]
    failed = []
    for name in SECTIONS:
        if only and name not in only and name.removesuffix(".py") not in only:
            continue
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name)], capture_output=True, text=True, cwd=ROOT)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            failed.append(name)
            parts += [f"## {name}: FAILED (exit {proc.returncode})", ""]
            continue
        parts += [proc.stdout.strip(), ""]
    if not only:
        out = ROOT / "docs" / "BENCHMARKS.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text("\n".join(parts))
        print(f"wrote {out.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
