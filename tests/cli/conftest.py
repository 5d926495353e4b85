"""Fixtures for the CLI contract tests: the installed `spotrun` executable, an isolated home and
config, and fast local jobs (tests/fixtures/counter.py on a one- or two-zone local market)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COUNTER = ROOT / "tests" / "fixtures" / "counter.py"

MARKET = """
name: cli
time_scale: 60
notice: 3
boot: 0.1
seed: 1
zones:
  - {{zone: z-a, region: r-1, instance_type: sim.gpu, gpu: A100, gpu_count: 1, gpu_memory_gb: 40, vcpus: 4,
     memory_gb: 16, spot_price: 1.00, ondemand_price: 4.00, interruption_rate: 0.0{outage}}}
"""

SPEC = """
name: {name}
resources: {{gpu: "A100:1", providers: [local], spot: true}}
workdir: work
run: python counter.py {args}
recovery: {{max_restarts: 0, capacity_wait: 2s, on_demand_fallback: false}}
workload: {{hours: 0.1}}
labels: {{team: nlp}}
local: {{market: market.yaml}}
{extra}
"""


def spotrun_exe() -> str:
    """The installed console script of this interpreter's environment."""
    exe = Path(sys.executable).with_name("spotrun")
    assert exe.is_file(), f"spotrun is not installed next to {sys.executable}"
    return str(exe)


@dataclass
class Env:
    root: Path
    env: dict[str, str]

    def job(
        self, args: str = "--total 8 --step-time 0.02", *, name: str = "cli", outage: bool = False, extra: str = ""
    ) -> Path:
        """A job folder with its spec; returns the spec's path."""
        folder = self.root / f"job-{len(list(self.root.glob('job-*')))}"
        (folder / "work").mkdir(parents=True)
        shutil.copy(COUNTER, folder / "work" / "counter.py")
        (folder / "market.yaml").write_text(MARKET.format(outage=", outages: [[0, 1000000]]" if outage else ""))
        spec = folder / "job.yaml"
        spec.write_text(SPEC.format(name=name, args=args, extra=extra))
        return spec

    def run(self, *args: str, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [spotrun_exe(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=self.root,
        )


@pytest.fixture
def cli_env(tmp_path: Path, spotrun_home: Path) -> Env:
    env = dict(os.environ)
    env["SPOTRUN_HOME"] = str(spotrun_home)
    env["SPOTRUN_CONFIG"] = str(tmp_path / "config.yaml")
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return Env(tmp_path, env)
