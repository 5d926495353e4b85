"""Exact resume whatever the data pipeline: every sampler torch ships (Random without a generator,
Weighted, SubsetRandom, Distributed at world size 1 and 2), a custom sampler with state (the
state_dict protocol) and one without (a `generator` attribute), num_workers 0/1/2,
persistent_workers, a dataset whose state moves mid-epoch, and extra state (an EMA model, a metric,
a plain value) — each run interrupted by a real SIGTERM at a seeded mid-epoch step, a SIGKILL at a
seeded step, and a SIGTERM at an epoch boundary, then resumed, must end bitwise equal to a run that
never stopped. Pipelines that cannot be replayed are refused at construction, saying what to change.

The training program is `tests/helpers_train.py matrix`; SPOTRUN_TEST_SEED fixes the steps.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers_train import MATRIX, Run, run_matrix
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from spotrun.checkpoint import EXIT_PREEMPTED, ResumableLoader
from spotrun.checkpoint.data import NotResumableError

SEED = int(os.environ.get("SPOTRUN_TEST_SEED", random.randrange(1 << 30)))
STEPS = 40


def final(run: Run) -> str:
    assert run.returncode == 0, run.output
    value = run.value("FINAL=")
    assert value and len(value) == 64, run.output
    return value


def resumed_from(run: Run) -> int:
    line = next(line for line in run.lines if line.startswith(("resuming at", "starting at")))
    return int(line.split()[-1].split("/")[0])


@pytest.mark.parametrize("config", sorted(MATRIX))
def test_interrupted_runs_end_bitwise_equal_to_the_uninterrupted_one(config: str, tmp_path: Path) -> None:
    per_epoch = MATRIX[config][3]
    rng = random.Random(f"{SEED}/{config}")
    term_mid = rng.choice([s for s in range(2, 2 * per_epoch) if s % per_epoch])  # mid-epoch
    with ThreadPoolExecutor(1) as pool:
        baseline = pool.submit(run_matrix, config, STEPS, tmp_path / "baseline")
        ck = tmp_path / "ck"
        first = run_matrix(config, STEPS, ck, term_at=term_mid)
        assert first.returncode == EXIT_PREEMPTED, first.output
        assert f"PREEMPTED at step {term_mid}" in first.output  # saved at the very step of the notice

        kill_at = rng.randrange(term_mid + 6, term_mid + 16)  # at least one periodic save in between
        second = run_matrix(config, STEPS, ck, kill_at=kill_at)
        assert resumed_from(second) == term_mid, second.output
        assert second.returncode == -9, second.output

        boundary = next(b for b in range(per_epoch, 10 * per_epoch, per_epoch) if b > kill_at)
        third = run_matrix(config, STEPS, ck, term_at=boundary if boundary < STEPS else None)
        third_from = resumed_from(third)
        # the newest committed save: the notice's, or a periodic one (due 5 steps after the last,
        # put off while the previous background write is still running, so on a loaded machine
        # it may land later than a multiple of 5 after the notice's)
        saves = [int(line.split()[1].rstrip(":")) for line in second.lines if line.startswith("checkpoint ")]
        committed = [term_mid, *saves]
        assert term_mid <= third_from <= kill_at, third.output
        assert third_from >= committed[-1] and all(
            b - a >= 5 for a, b in zip(committed, committed[1:], strict=False)
        ), second.output + third.output
        if boundary < STEPS:
            assert third.returncode == EXIT_PREEMPTED, third.output
            last = run_matrix(config, STEPS, ck)
            assert resumed_from(last) == boundary, last.output
        else:
            last = third
        assert final(last) == final(baseline.result()), (
            f"{config}: SIGTERM at {term_mid}, SIGKILL at {kill_at}, SIGTERM at {boundary} (SPOTRUN_TEST_SEED={SEED})"
        )


def test_a_notice_at_the_last_step_finishes_the_run(tmp_path: Path) -> None:
    run = run_matrix("random-w0", 12, tmp_path / "ck", term_at=12)
    assert run.returncode == 0 and "PREEMPTED" not in run.output, run.output
    final(run)


# --- refused at construction, with what to change ----------------------------------------------


class _Data(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> int:
        return i


class _GlobalDraws(Sampler):
    def __len__(self) -> int:
        return 10

    def __iter__(self):  # noqa: ANN204
        return iter(torch.randperm(10).tolist())  # the global torch RNG


class _HiddenState(Sampler):
    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return 10

    def __iter__(self):  # noqa: ANN204
        self.calls += 1
        return iter([(i + self.calls) % 10 for i in range(10)])


class _PythonRandom(Sampler):
    def __init__(self) -> None:
        self.generator = None  # given one, but it draws from `random` anyway

    def __len__(self) -> int:
        return 10

    def __iter__(self):  # noqa: ANN204
        order = list(range(10))
        random.shuffle(order)
        return iter(order)


class _Stream(IterableDataset):
    def __iter__(self):  # noqa: ANN204
        return iter(range(3))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DataLoader(_Data(), sampler=_GlobalDraws()), r"draws from the global random state.*generator"),
        (lambda: DataLoader(_Data(), sampler=_PythonRandom()), r"global random state"),
        (lambda: DataLoader(_Data(), sampler=_HiddenState()), r"yields different indices.*state_dict\(\)"),
        (lambda: DataLoader(_Data(), batch_sampler=_BatchOf(_GlobalDraws())), r"batch_sampler.*global random"),
        (lambda: DataLoader(_Stream()), r"map-style dataset"),
    ],
    ids=["global-torch-rng", "global-python-rng", "hidden-state", "custom-batch-sampler", "iterable-dataset"],
)
def test_pipelines_that_cannot_be_replayed_are_refused_at_construction(make, match: str) -> None:
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    with pytest.raises(NotResumableError, match=match):
        ResumableLoader(make())
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state  # probing moved nothing


class _BatchOf(Sampler):
    def __init__(self, inner: Sampler) -> None:
        self.sampler = inner

    def __len__(self) -> int:
        return 5

    def __iter__(self):  # noqa: ANN204
        order = list(self.sampler)
        return iter([order[i : i + 2] for i in range(0, 10, 2)])


def test_probing_leaves_an_accepted_custom_sampler_where_it_was() -> None:
    from helpers_train import _matrix_objects

    _, loader = _matrix_objects("custom-stateful", 0, False)
    before = loader.sampler.state_dict()
    ResumableLoader(loader)
    assert loader.sampler.state_dict() == before
