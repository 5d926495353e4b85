"""`spotrun --help` and `spotrun status` must not import torch or any cloud SDK."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "boto3", "botocore", "google", "azure", "numpy", "moto")

PROBE = """
import json, sys
from spotrun.cli.app import app
sys.argv = ["spotrun"] + {args!r}
try:
    app()
except SystemExit:
    pass
print("MODULES=" + json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["status"], ["status", "--json"], ["logs", "--help"]])
def test_cli_start_imports_nothing_heavy(args):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=60)
    line = [x for x in proc.stderr.splitlines() if x.startswith("MODULES=")][-1]
    modules = json.loads(line.removeprefix("MODULES="))
    heavy = [m for m in modules if m.split(".")[0] in HEAVY]
    assert heavy == [], f"spotrun {' '.join(args)} imported {heavy[:10]}"


def test_status_with_no_jobs_says_how_to_start():
    proc = subprocess.run([sys.executable, "-m", "spotrun", "status"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "spotrun launch configs/quickstart.yaml" in proc.stdout


def test_status_json_with_no_jobs_is_an_empty_list():
    proc = subprocess.run(
        [sys.executable, "-m", "spotrun", "status", "--json"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and json.loads(proc.stdout) == []


def test_unknown_job_is_bad_input():
    proc = subprocess.run(
        [sys.executable, "-m", "spotrun", "status", "nope"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "no job 'nope'" in proc.stderr
