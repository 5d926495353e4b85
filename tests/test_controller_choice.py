"""`controller: local | cloud` in the spec, or else the config file (issue 16, item 1): the spec's
choice wins; an unknown value is refused with the file, line and what is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_faults_kill import MARKET

ROOT = Path(__file__).resolve().parents[1]
SMALL = """
  - {zone: z-c, region: r-1, instance_type: sim.small, vcpus: 2, memory_gb: 4,
     spot_price: 0.006, ondemand_price: 0.02, interruption_rate: 0.0}
"""
SPEC = """name: choice
resources: {{gpu: "A100:1", providers: [local]}}
run: python train.py
workload: {{hours: 1}}
local: {{market: market.yaml}}
{extra}"""


def plan(tmp: Path, extra: str, config: str | None) -> subprocess.CompletedProcess[str]:
    (tmp / "market.yaml").write_text(MARKET.rstrip() + SMALL)
    spec = tmp / "job.yaml"
    spec.write_text(SPEC.format(extra=extra))
    env = dict(os.environ, SPOTRUN_HOME=str(tmp / "home"), SPOTRUN_CONFIG=str(tmp / "config.yaml"))
    (tmp / "config.yaml").write_text(config or "{}\n")
    command = [sys.executable, "-m", "spotrun", "plan", str(spec), "--json"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


def test_the_spec_chooses_the_controller_over_the_config(tmp_path: Path) -> None:
    by_spec = plan(tmp_path, "controller: cloud\n", None)
    assert by_spec.returncode == 0, by_spec.stderr
    host = json.loads(by_spec.stdout)["controller_host"]
    assert (host["instance_type"], host["hourly_usd"]) == ("sim.small", 0.02)
    assert json.loads(plan(tmp_path, "", None).stdout).get("controller_host") is None  # default: local
    assert json.loads(plan(tmp_path, "", "controller: cloud\n").stdout).get("controller_host") is not None
    local = plan(tmp_path, "controller: local\n", "controller: cloud\n")  # the spec wins
    assert json.loads(local.stdout).get("controller_host") is None


def test_an_unknown_controller_is_refused_with_its_line(tmp_path: Path) -> None:
    out = plan(tmp_path, "controller: remote\n", None)
    assert out.returncode == 2
    (issue,) = json.loads(out.stdout)["error"]["issues"]
    assert (Path(issue["file"]).name, issue["line"], issue["key"]) == ("job.yaml", 6, "controller")
    assert issue["message"] == "'remote' is not allowed; allowed: local, cloud"
