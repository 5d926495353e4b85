"""Exact resume, end to end: examples/train.py in separate processes, interrupted and resumed,
must end with the weights of the uninterrupted run, bit for bit.

The run has dropout, a shuffled DataLoader with 2 workers that augment with their own RNG, AdamW
and a OneCycle schedule; 96 steps cross three epoch boundaries (24 batches an epoch) and periodic
checkpoints every 16 steps land both mid-epoch and exactly on an epoch's end (48, 96).

SPOTRUN_TEST_DEVICE=cuda runs the same on the GPU (deterministic algorithms on).
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers_train import Run, child_env, run_example

from spotrun.checkpoint import EXIT_PREEMPTED, complete_checkpoints, latest_checkpoint, step_dirname

DEVICE = os.environ.get("SPOTRUN_TEST_DEVICE", "cpu")
STEPS, EVERY, SAMPLES = 96, 16, 1536
ARGS = ["--steps", str(STEPS), "--every-steps", str(EVERY), "--samples", str(SAMPLES), "--log-every", "1"]
ARGS += ["--device", DEVICE]
SEED = int(os.environ.get("SPOTRUN_TEST_SEED", random.randrange(1 << 30)))

if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("SPOTRUN_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)


Baseline = tuple[str, dict[str, torch.Tensor]]


def assert_same_final(run: Run, out: Path, baseline: Future[Baseline]) -> None:
    digest, weights = baseline.result()
    assert run.returncode == 0, run.output
    assert run.value("FINAL_WEIGHTS_SHA256=") == digest, f"seed {SEED}\n{run.output}"
    assert (out / "weights.sha256").read_text().strip() == digest
    resumed = final_weights(out)
    assert resumed.keys() == weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(resumed[key], tensor), f"{key} differs (seed {SEED})"


def run_uninterrupted(tmp: Path) -> Baseline:
    run = run_example(ARGS, child_env(tmp / "ck", tmp / "out"))
    assert run.returncode == 0, run.output
    digest = run.value("FINAL_WEIGHTS_SHA256=")
    assert digest and len(digest) == 64
    assert [p.name for p in complete_checkpoints(tmp / "ck")] == [step_dirname(s) for s in (64, 80, 96)]
    return digest, final_weights(tmp / "out")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future[Baseline]]:
    """The uninterrupted run, in the background while the interrupted ones run (one core each)."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(run_uninterrupted, tmp_path_factory.mktemp("uninterrupted"))


def test_sigterm_at_a_random_step_resumes_from_the_preemption_save(tmp_path: Path, baseline) -> None:
    at = random.Random(SEED).randrange(3, STEPS - 10)
    progress = tmp_path / "progress.json"
    env = child_env(tmp_path / "ck", tmp_path / "out", SPOTRUN_PROGRESS_FILE=str(progress))
    first = run_example(ARGS, env, signal_at=at, sig=signal.SIGTERM)
    assert first.returncode == EXIT_PREEMPTED, first.output
    saved = int(first.value("PREEMPTED at step").split(":")[0])
    assert saved >= at
    assert latest_checkpoint(tmp_path / "ck").name == step_dirname(saved)  # saved on notice, not periodic
    assert first.value("FINAL_WEIGHTS_SHA256=") is None
    assert json.loads(progress.read_text())["step"] == saved

    second = run_example(ARGS, env)
    assert f"resuming at step {saved}/{STEPS}" in second.output
    assert_same_final(second, tmp_path / "out", baseline)


def test_sigkill_without_notice_resumes_from_the_last_periodic_checkpoint(tmp_path: Path, baseline) -> None:
    at = random.Random(SEED + 1).randrange(2 * EVERY + 2, STEPS - 5)
    env = child_env(tmp_path / "ck", tmp_path / "out")
    first = run_example(ARGS, env, signal_at=at, sig=signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL, first.output
    latest = latest_checkpoint(tmp_path / "ck")
    assert latest is not None
    resumed_at = int(latest.name)
    assert resumed_at > 0 and resumed_at % EVERY == 0  # nothing but periodic saves without a notice

    second = run_example(ARGS, env)
    assert f"resuming at step {resumed_at}/{STEPS}" in second.output
    assert_same_final(second, tmp_path / "out", baseline)
