"""CLI start-up: `spotrun --help` and `spotrun status` beside a bare `python -c pass`.

Paired: each round runs the three commands back to back (in a rotating order), so a busy machine
slows all three alike; the ratio is the median of the per-round ratios. Targets (issue 15):
`--help` <= 6x and `status` <= 8x `python -c pass`. Also proves what they import: neither may
load torch, a cloud SDK or pydantic.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPEATS = 21
HEAVY = ("torch", "boto3", "botocore", "google.cloud", "azure", "numpy", "pydantic")
TARGETS = {"--help": 6.0, "status": 8.0}


def once(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def paired(cmds: dict[str, list[str]], env: dict[str, str]) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of every command, REPEATS rounds, all commands once per round."""
    names = list(cmds)
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for i in range(REPEATS):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            samples[name].append(once(cmds[name], env))
    return samples


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
    cmds = {"pass": [sys.executable, "-c", "pass"]}
    for args in ("--help", "status"):
        cmds[args] = [sys.executable, "-m", "spotrun", args]
    for cmd in cmds.values():  # warm the page cache and the .pyc files
        once(cmd, env)
    samples = paired(cmds, env)
    base = statistics.median(w for w, _ in samples["pass"])
    base_cpu = statistics.median(c for _, c in samples["pass"])
    print("## CLI start-up")
    print()
    print(
        f"Command: `python scripts/bench_cli.py` ({REPEATS} paired rounds: each round runs all three "
        "back to back; a ratio is the median of the per-round ratios, wall and CPU (user + system) time)."
    )
    print()
    print("| command | median wall | median CPU | ratio (wall) | ratio (CPU) | target | heavy imports |")
    print("|---|---|---|---|---|---|---|")
    print(f"| `python -c pass` | {base * 1000:.0f} ms | {base_cpu * 1000:.0f} ms | 1.00 | 1.00 | — | — |")
    for args in ("--help", "status"):
        wall = statistics.median(w for w, _ in samples[args])
        cpu = statistics.median(c for _, c in samples[args])
        pairs = list(zip(samples[args], samples["pass"], strict=True))
        ratio = statistics.median(w / b for (w, _), (b, _) in pairs)
        ratio_cpu = statistics.median(c / max(b, 1e-6) for (_, c), (_, b) in pairs)
        heavy = [m for m in imported_modules([args], env) if any(m == h or m.startswith(h + ".") for h in HEAVY)]
        print(
            f"| `spotrun {args}` | {wall * 1000:.0f} ms | {cpu * 1000:.0f} ms | {ratio:.2f} | {ratio_cpu:.2f} | "
            f"<= {TARGETS[args]:g} | {', '.join(heavy) or 'none'} |"
        )


if __name__ == "__main__":
    main()
