"""A training script whose resume could not be exact, launched through spotrun on the local
provider: the checkpoint library refuses it at start, so the job FAILS (it never ends SUCCEEDED
with weights a resume would have changed) and `spotrun status` shows the library's reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = '''
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from spotrun.checkpoint import Checkpointer, ResumableLoader


class Shuffled(Sampler):
    """Draws its order from the global torch RNG: a resumed run could not replay it."""

    def __len__(self):
        return 16

    def __iter__(self):
        return iter(torch.randperm(16).tolist())


model = torch.nn.Linear(2, 1)
data = ResumableLoader(DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4, sampler=Shuffled()))
ck = Checkpointer(model=model, loader=data, total_steps=8)
print("TRAINING STARTED (must not happen)", flush=True)
'''

MARKET = """
name: refusal
time_scale: 60
notice: 3
boot: 0.1
seed: 1
zones:
  - {zone: z-a, region: r-1, instance_type: sim.gpu, gpu: A100, gpu_count: 1, gpu_memory_gb: 40, vcpus: 4,
     memory_gb: 16, spot_price: 1.00, ondemand_price: 4.00, interruption_rate: 0.0}
"""

SPEC = """
name: refusal
resources: {gpu: "A100:1", providers: [local]}
workdir: work
run: python train.py
recovery: {max_restarts: 0}
workload: {hours: 0.1}
local: {market: market.yaml}
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "spotrun", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_a_script_whose_resume_cannot_be_exact_fails_with_the_reason_in_status(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "train.py").write_text(SCRIPT)
    (tmp_path / "market.yaml").write_text(MARKET)
    (tmp_path / "job.yaml").write_text(SPEC)

    proc = cli("launch", str(tmp_path / "job.yaml"), "--json")
    result = json.loads(proc.stdout)
    assert result["status"] == "FAILED" and proc.returncode != 0, proc.stdout + proc.stderr
    status = cli("status", result["job_id"], "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["status"] == "FAILED"
    text = json.dumps(report)
    assert "NotResumableError" in text and "draws from the global random state" in text, text
    assert "TRAINING STARTED" not in cli("logs", result["job_id"]).stdout
