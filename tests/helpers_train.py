"""Helpers for the checkpoint tests: run training in a separate process and interrupt it.

Also a child program (`python tests/helpers_train.py saver ROOT MB`) that saves back to back in
the background until killed, for the "SIGKILL during a save" test.
"""

from __future__ import annotations

import os
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


if __name__ == "__main__":
    if sys.argv[1:2] == ["saver"]:
        saver_child(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"usage: {sys.argv[0]} saver ROOT MEGABYTES")
