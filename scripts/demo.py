"""`make demo`: one complete job on the local provider, end to end.

Real torch training (examples/train.py) launched with `spotrun launch configs/quickstart.yaml`
on the local simulated spot market, which preempts it (with notice) in more than one zone; the
controller relaunches elsewhere and the job resumes from its checkpoints in the Store. Beside
it, the same script runs once uninterrupted; the demo ends by comparing the two final weight
hashes and fails (non-zero exit) unless they are equal and the job saw >= 2 preemptions in
>= 2 zones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "configs" / "quickstart.yaml"
HOME = ROOT / ".spotrun" / "demo"


def spotrun(*args: str, env: dict[str, str], capture: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spotrun", *args], env=env, cwd=ROOT, text=True, capture_output=capture
    )


def start_reference(run: str, workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
    """The same command, once, with no spotrun and no preemption: the hash to match."""
    tmp = Path(tempfile.mkdtemp(prefix="spotrun-reference-"))
    ref_env = dict(env, SPOTRUN_CHECKPOINT_DIR=str(tmp / "ckpt"), SPOTRUN_OUTPUT_DIR=str(tmp / "out"))
    ref_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{ref_env.get('PATH', '')}"
    proc = subprocess.Popen(
        run, shell=True, cwd=workdir, env=ref_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    return proc, tmp


def main() -> int:
    from spotrun.spec import load_spec

    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    env = dict(os.environ, SPOTRUN_HOME=str(HOME))
    spec = load_spec(SPEC)
    assert spec.workdir is not None

    print(f"spotrun demo: {SPEC.relative_to(ROOT)} on the local simulated spot market (SPOTRUN_HOME={HOME})")
    print("starting the reference run (same script, uninterrupted) in the background...\n", flush=True)
    t0 = time.time()
    reference, ref_dir = start_reference(spec.run, spec.workdir, env)

    launch = spotrun("launch", str(SPEC), "--yes", env=env)
    job = json.loads(spotrun("status", "--json", env=env, capture=True).stdout)[0]
    print()
    spotrun("status", job["job_id"], env=env)

    ref_err = reference.communicate()[1]
    if reference.returncode != 0:
        print(f"reference run failed:\n{ref_err}")
        return 1
    ref_hash = (ref_dir / "out" / "weights.sha256").read_text().strip()
    out = HOME / "store" / "jobs" / job["job_id"] / "outputs" / "weights.sha256"
    job_hash = out.read_text().strip() if out.exists() else "(missing)"

    zones = job["zones"]
    checks = {
        "job succeeded": launch.returncode == 0 and job["status"] == "SUCCEEDED",
        ">= 2 preemptions": job["preemptions"] >= 2,
        ">= 2 zones": len(zones) >= 2,
        "weights equal to the uninterrupted run": job_hash == ref_hash,
    }
    od = job["ondemand_equivalent_usd"]
    print("\n================ spotrun demo summary ================")
    print(f"job               {job['job_id']}  {job['status']}")
    print(f"attempts          {job['attempts']}   preemptions {job['preemptions']}   zones {', '.join(zones)}")
    print(f"simulated spend   ${job['spent_usd']:.2f} spot vs ${od:.2f} on-demand for the same hours" if od else "")
    print(f"final weights     {job_hash}")
    print(f"uninterrupted run {ref_hash}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print(f"demo took {time.time() - t0:.0f} s.  Look around:")
    print(f"  SPOTRUN_HOME={HOME.relative_to(ROOT)} .venv/bin/spotrun status {job['job_id']}")
    print(f"  SPOTRUN_HOME={HOME.relative_to(ROOT)} .venv/bin/spotrun logs {job['job_id']}")
    shutil.rmtree(ref_dir, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
