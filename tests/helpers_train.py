"""Helpers for the checkpoint tests: run training in a separate process and interrupt it.

Child programs:
* `python tests/helpers_train.py saver ROOT MB` saves back to back in the background until
  killed, for the "SIGKILL during a save" test;
* `python tests/helpers_train.py matrix CONFIG STEPS [--term-at N] [--kill-at N]` trains a tiny
  model with the data pipeline CONFIG names (see `MATRIX`), checkpointing every 5 steps, and
  signals its own process group (workers included) right after step N: a real SIGTERM or SIGKILL
  at an exact step. Its last line is FINAL=<sha256 of model, EMA, metric and plain state>.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train.py"
STEP_LINE = re.compile(r"^step (\d+)/")


@dataclass
class Run:
    returncode: int
    lines: list[str] = field(default_factory=list)
    signalled_at: int | None = None  # the last step printed before the signal went out

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def value(self, prefix: str) -> str | None:
        for line in self.lines:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        return None


def child_env(checkpoint_dir: Path, output_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTRUN_")}
    env.update(PYTHONPATH=str(ROOT), SPOTRUN_CHECKPOINT_DIR=str(checkpoint_dir), **extra)
    if output_dir is not None:
        env["SPOTRUN_OUTPUT_DIR"] = str(output_dir)
    return env


def run_example(
    args: list[str],
    env: dict[str, str],
    *,
    signal_at: int | None = None,
    sig: int = signal.SIGTERM,
    timeout: float = 120,
) -> Run:
    """Run examples/train.py; with signal_at, send `sig` once it prints step >= signal_at
    (pass --log-every 1 so every step is printed). The run leads its own process group and the
    signal goes to the whole group, DataLoader workers included, as the Agent sends it."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    run = Run(returncode=-1)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            run.lines.append(line.rstrip("\n"))
            m = STEP_LINE.match(line)
            if signal_at is not None and run.signalled_at is None and m and int(m.group(1)) >= signal_at:
                run.signalled_at = int(m.group(1))
                os.killpg(proc.pid, sig)
            if time.monotonic() > deadline:
                raise TimeoutError(f"training did not finish in {timeout} s:\n{run.output}")
        run.returncode = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return run


def saver_child(root: str, megabytes: int) -> None:
    """Save a model whose weights all equal the step, in the background, back to back, forever."""
    import torch

    from spotrun.checkpoint import Checkpointer

    model = torch.nn.Linear(megabytes * 256, 1024, bias=False)  # 1024 x 256*MB float32 = MB MiB
    ck = Checkpointer(model=model, root=root, keep=2, handle_signals=False)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(float(step))
        ck.save(step, sync=False)
        print(f"SAVING {step}", flush=True)
        ck.wait()


# --- the exact-resume matrix's training program -------------------------------------------------

# config -> (sampler, num_workers, persistent_workers, batches per epoch)
MATRIX: dict[str, tuple[str, int, bool, int]] = {
    "random-w0": ("random", 0, False, 12),
    "random-w2-persistent": ("random", 2, True, 12),
    "weighted-w0": ("weighted", 0, False, 12),
    "subset-w1": ("subset", 1, False, 9),
    "distributed-ws2-w0": ("distributed", 0, False, 6),
    "custom-stateful-w0": ("custom-stateful", 0, False, 12),
    "custom-stateful-w2": ("custom-stateful", 2, False, 12),
    "custom-generator-w1": ("custom-generator", 1, False, 12),
}


def _matrix_objects(kind: str, workers: int, persistent: bool):  # noqa: ANN202 (torch types, imported late)
    import numpy as np
    import torch
    from torch.utils import data as tud

    class Noisy(tud.Dataset):
        """48 samples; every fetch draws from torch, random and numpy (the worker's, or the main
        process's global RNGs with num_workers=0), and from a curriculum level set by training."""

        def __init__(self) -> None:
            g = torch.Generator().manual_seed(7)
            self.x, self.y = torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g)
            self.level = 0.0

        def __len__(self) -> int:
            return 48

        def __getitem__(self, i: int):  # noqa: ANN204
            jitter = 0.1 * torch.randn(4) + random.random() * 0.01 + float(np.random.rand()) * 0.01
            return self.x[i] + jitter + self.level, self.y[i]

        def state_dict(self) -> dict:
            return {"level": self.level}

        def load_state_dict(self, state: dict) -> None:
            self.level = state["level"]

    class Stateful(tud.Sampler):
        """Walks the data in a rotating order; its offset is its state (the protocol)."""

        def __init__(self, n: int) -> None:
            self.n, self.offset = n, 0

        def __len__(self) -> int:
            return self.n

        def __iter__(self):  # noqa: ANN204
            start, self.offset = self.offset, (self.offset + 5) % self.n
            return iter([(start + 7 * i) % self.n for i in range(self.n)])

        def state_dict(self) -> dict:
            return {"offset": self.offset}

        def load_state_dict(self, state: dict) -> None:
            self.offset = state["offset"]

    class WithGenerator(tud.Sampler):
        """No state of its own; draws from `self.generator` (None: spotrun gives it one)."""

        def __init__(self, n: int) -> None:
            self.n, self.generator = n, None

        def __len__(self) -> int:
            return self.n

        def __iter__(self):  # noqa: ANN204
            return iter(torch.randperm(self.n, generator=self.generator).tolist())

    ds = Noisy()
    sampler: object = None
    shuffle = False
    if kind == "random":
        shuffle = True
    elif kind == "weighted":
        sampler = tud.WeightedRandomSampler(torch.linspace(0.1, 1.0, 48), 48, replacement=True)
    elif kind == "subset":
        sampler = tud.SubsetRandomSampler(list(range(0, 48, 4)) + list(range(1, 48, 2)))
    elif kind == "distributed":
        sampler = tud.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
    elif kind == "distributed1":
        sampler = tud.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
    elif kind == "custom-stateful":
        sampler = Stateful(48)
    elif kind == "custom-generator":
        sampler = WithGenerator(48)
    loader = tud.DataLoader(
        ds, batch_size=4, shuffle=shuffle, sampler=sampler, num_workers=workers, persistent_workers=persistent
    )
    return ds, loader


class _Ema:
    """An exponential moving average of a model's weights (a module of its own)."""

    def __init__(self, model) -> None:  # noqa: ANN001
        import copy

        self.model = copy.deepcopy(model)

    def update(self, model, decay: float = 0.9) -> None:  # noqa: ANN001
        import torch

        with torch.no_grad():
            for e, p in zip(self.model.parameters(), model.parameters()):  # noqa: B905
                e.mul_(decay).add_(p, alpha=1 - decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class _Mean:
    """A running-mean metric with state_dict()/load_state_dict()."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, value: float) -> None:
        self.total, self.count = self.total + value, self.count + 1

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = state["total"], state["count"]


def matrix_child(config: str, steps: int, term_at: int | None, kill_at: int | None) -> int:
    import hashlib

    import numpy as np
    import torch

    from spotrun.checkpoint import EXIT_PREEMPTED, Checkpointer, ResumableLoader, state_hash

    kind, workers, persistent, _ = MATRIX[config]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    ds, loader = _matrix_objects(kind, workers, persistent)
    data = ResumableLoader(loader)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    ema, metric = _Ema(model), _Mean()
    ck = Checkpointer(
        model=model,
        optimizer=opt,
        scheduler=sched,
        loader=data,
        state={"ema": ema, "metric": metric, "best": float("inf")},
        every_steps=5,
        keep=2,
        total_steps=steps,
    )
    step = ck.restore()
    print(f"{'resuming at' if step else 'starting at'} step {step}/{steps}", flush=True)
    while step < steps:
        for x, y in data:
            loss = (model(x) - y).pow(2).mean() + 0.01 * torch.randn(()).abs()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ema.update(model)
            metric.update(loss.item())
            ck.state["best"] = min(ck.state["best"], loss.item())
            ds.level = 0.01 * (step // 5)  # a curriculum that moves mid-epoch (the dataset's state)
            step += 1
            print(f"step {step}/{steps}", flush=True)
            if step == kill_at:
                os.killpg(0, signal.SIGKILL)
            if step == term_at:
                os.killpg(0, signal.SIGTERM)  # the whole group, workers too, as the Agent does
            if ck.step(step):
                ck.close()
                print(f"PREEMPTED at step {step}", flush=True)
                return EXIT_PREEMPTED
            if step >= steps:
                break
    ck.close()
    h = hashlib.sha256()
    for part in (state_hash(model), state_hash(ema.model), repr(metric.state_dict()), repr(ck.state["best"])):
        h.update(part.encode())
    print(f"FINAL={h.hexdigest()}", flush=True)
    return 0


def run_matrix(config: str, steps: int, ck_dir: Path, *, term_at: int | None = None, kill_at: int | None = None) -> Run:
    args = [config, str(steps)]
    if term_at is not None:
        args += ["--term-at", str(term_at)]
    if kill_at is not None:
        args += ["--kill-at", str(kill_at)]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "matrix", *args],
        env=child_env(ck_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # its own process group: the child signals only itself and its workers
        timeout=120,
    )
    return Run(returncode=proc.returncode, lines=proc.stdout.splitlines())


if __name__ == "__main__":
    if sys.argv[1:2] == ["saver"]:
        saver_child(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["matrix"]:
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("config", choices=sorted(MATRIX))
        p.add_argument("steps", type=int)
        p.add_argument("--term-at", type=int)
        p.add_argument("--kill-at", type=int)
        a = p.parse_args(sys.argv[2:])
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        sys.exit(matrix_child(a.config, a.steps, a.term_at, a.kill_at))
    else:
        sys.exit(f"usage: {sys.argv[0]} saver ROOT MEGABYTES | matrix CONFIG STEPS [--term-at N] [--kill-at N]")
