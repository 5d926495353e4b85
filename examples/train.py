"""A small, real training run that survives preemption and resumes bit for bit.

A CNN learns to classify synthetic 24x24 images (ten smoothed random prototypes plus noise, made
from a fixed seed: nothing to download). It has what makes exact resume hard: dropout, a shuffled
DataLoader with 2 worker processes that augment each sample with their own RNG, AdamW, a OneCycle
LR schedule. spotrun.checkpoint saves it every --every-steps steps in the background, and on
SIGTERM (a preemption notice) saves at the next step and exits with 143; run it again with the
same arguments and it continues where it stopped. Same arguments, same final weights, whatever
the interruptions: the last line is FINAL_WEIGHTS_SHA256=<hex>.

    python examples/train.py                       # ~50 s on one CPU core
    SPOTRUN_CHECKPOINT_DIR=/tmp/ck python examples/train.py --steps 600 --every-steps 100

Environment (all optional): SPOTRUN_CHECKPOINT_DIR (default ./checkpoints), SPOTRUN_OUTPUT_DIR
(weights.sha256 and model.pt are written there at the end), SPOTRUN_PROGRESS_FILE,
SPOTRUN_NOTICE_FILE.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from spotrun.checkpoint import EXIT_PREEMPTED, Checkpointer, ResumableLoader, state_hash

DATA_SEED, INIT_SEED, ORDER_SEED = 1234, 0, 42


class SyntheticImages(Dataset):
    """Ten classes of smoothed random prototypes plus noise; each fetch shifts the image and adds
    fresh noise drawn from the loading worker's own torch RNG (seeded by the DataLoader)."""

    def __init__(self, n: int = 4096, size: int = 24, classes: int = 10, seed: int = DATA_SEED) -> None:
        g = torch.Generator().manual_seed(seed)
        prototypes = F.avg_pool2d(torch.randn(classes, 1, size, size, generator=g), 5, 1, 2)
        self.labels = torch.randint(classes, (n,), generator=g)
        self.images = prototypes[self.labels] + 1.0 * torch.randn(n, 1, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        dy, dx = torch.randint(-2, 3, (2,)).tolist()
        x = torch.roll(self.images[i], shifts=(dy, dx), dims=(1, 2))
        return x + 0.3 * torch.randn_like(x), self.labels[i]


def make_model(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32 * 6 * 6, 128),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(128, classes),
    )


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy, spelled with gather: NLLLoss may refuse to run on CUDA under
    torch.use_deterministic_algorithms(True), gather's backward does not."""
    return -F.log_softmax(logits, dim=1).gather(1, labels[:, None]).mean()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2400, help="optimizer steps in all (default: ~50 s on 1 core)")
    p.add_argument("--every-steps", type=int, default=200, help="checkpoint every K steps (0: never)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (to watch it)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=4096, help="dataset size (an epoch: samples/batch-size steps)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--log-every", type=int, default=100, help="print a progress line every N steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda (deterministic algorithms on)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    return p.parse_args(argv)


def setup_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    return device


def write_outputs(model: nn.Module, digest: str) -> None:
    out = os.environ.get("SPOTRUN_OUTPUT_DIR")
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "weights.sha256").write_text(digest + "\n")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(out, "model.pt"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    device = setup_device(args.device)
    torch.manual_seed(INIT_SEED)

    loader = DataLoader(
        SyntheticImages(args.samples),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(ORDER_SEED),
        drop_last=True,
    )
    data = ResumableLoader(loader)
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.steps)
    ck = Checkpointer(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=data,
        every_steps=args.every_steps or None,
        keep=args.keep,
        total_steps=args.steps,
    )
    step = ck.restore()
    print(f"{'resuming at' if step else 'starting at'} step {step}/{args.steps}", flush=True)
    started, loss_sum, seen = time.perf_counter(), 0.0, 0
    model.train()
    while step < args.steps:
        for x, y in data:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum, seen = loss_sum + loss.item(), seen + 1
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if step % args.log_every == 0 or step == args.steps:
                ms = 1000 * (time.perf_counter() - started) / seen
                print(
                    f"step {step}/{args.steps} loss {loss_sum / seen:.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {ms:.1f} ms/step",
                    flush=True,
                )
                started, loss_sum, seen = time.perf_counter(), 0.0, 0
            if ck.step(step):
                ck.close()
                print(f"PREEMPTED at step {step}: checkpoint saved, exiting", flush=True)
                return EXIT_PREEMPTED
            if step >= args.steps:
                break
    ck.close()
    digest = state_hash(model)
    write_outputs(model, digest)
    print(f"FINAL_WEIGHTS_SHA256={digest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
