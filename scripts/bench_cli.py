"""CLI start-up: `spotrun --help` and `spotrun status` beside a bare `python -c pass`.

Also proves what they import: neither may load torch or a cloud SDK.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPEATS = 15
HEAVY = ("torch", "boto3", "botocore", "google.cloud", "azure", "numpy")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    samples = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def imported_modules(args: list[str], env: dict[str, str]) -> list[str]:
    code = (
        "import sys, json\n"
        "from spotrun.cli.app import app\n"
        f"sys.argv = ['spotrun'] + {args!r}\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in sys.modules if m.split('.')[0] in {list({h.split('.')[0] for h in HEAVY})!r}]),"
        " file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return json.loads(proc.stderr.strip().splitlines()[-1])


def main() -> None:
    env = dict(os.environ, SPOTRUN_HOME=tempfile.mkdtemp(prefix="spotrun-bench-"))
    base = timed([sys.executable, "-c", "pass"], env)
    rows = []
    for args in (["--help"], ["status"]):
        t = timed([sys.executable, "-m", "spotrun", *args], env)
        heavy = [m for m in imported_modules(args, env) if any(m == h or m.startswith(h + ".") for h in HEAVY)]
        rows.append((" ".join(args), t, heavy))
    print("## CLI start-up")
    print()
    print(f"Command: `python scripts/bench_cli.py` (median of {REPEATS} runs each, same run).")
    print()
    print("| command | median | beyond `python -c pass` | ratio to `python -c pass` | heavy modules imported |")
    print("|---|---|---|---|---|")
    print(f"| `python -c pass` | {base * 1000:.0f} ms | — | 1.00 | — |")
    for name, t, heavy in rows:
        print(
            f"| `spotrun {name}` | {t * 1000:.0f} ms | {(t - base) * 1000:.0f} ms | {t / base:.2f} | "
            f"{', '.join(heavy) or 'none'} |"
        )


if __name__ == "__main__":
    main()
