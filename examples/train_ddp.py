"""A small multi-node DDP run (gloo on CPU, NCCL on GPUs) that survives the loss of any node.

Run it under torchrun; in a spotrun job with `resources.nodes: N`, write `run: torchrun
examples/train_ddp.py` and the Agent fills in the rendezvous (--nnodes, --node-rank,
--rdzv-backend c10d, --rdzv-endpoint: node 0's private address, learnt through the store).

    torchrun --nproc-per-node 2 examples/train_ddp.py --steps 60

A small MLP learns a fixed random regression with dropout, AdamW and a DistributedSampler that
shuffles per epoch; spotrun.checkpoint.sharded saves it with torch.distributed.checkpoint every
--every-steps steps and when any node gets a notice (all ranks save the same step). Same world
size, same arguments: the same final weights, whatever the interruptions. Rank 0 prints
FINAL_WEIGHTS_SHA256=<hex> and writes it to $SPOTRUN_OUTPUT_DIR/weights.sha256.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from spotrun.checkpoint import EXIT_PREEMPTED, ResumableLoader, state_hash
from spotrun.checkpoint.sharded import ShardedCheckpointer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step (tests: time to preempt)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Bit-for-bit across relaunches: the same kernels with the same reduction order wherever a rank
    # lands (torchrun sets 1 thread only when a node runs several ranks; a CPU's default varies).
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(512, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(512, 1, generator=g)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=42)
    loader = ResumableLoader(DataLoader(data, batch_size=args.batch, sampler=sampler))
    # find_unused_parameters=True keeps DDP's gradient buckets in their first layout: a relaunched
    # run would otherwise reduce its first step in the initial layout and the uninterrupted one in
    # the rebuilt layout, and with 3+ ranks a different summation order changes the last bits.
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    model = DistributedDataParallel(net, find_unused_parameters=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1000 + rank)  # each rank's own dropout stream (saved and restored per rank)
    ck = ShardedCheckpointer(
        model=model, optimizer=opt, loader=loader, every_steps=args.every_steps, total_steps=args.steps
    )
    step = ck.restore()
    if rank == 0:
        print(f"world {world}: starting at step {step}", flush=True)
    while step < args.steps:
        for xb, yb in loader:
            loss = nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if ck.step(step):
                if rank == 0:
                    print(f"stopping at step {step}: checkpoint saved", flush=True)
                dist.destroy_process_group()
                return EXIT_PREEMPTED
            if step >= args.steps:
                break
    digest = state_hash(model.module)
    if rank == 0:
        print(f"FINAL_WEIGHTS_SHA256={digest}", flush=True)
        out = os.environ.get("SPOTRUN_OUTPUT_DIR")
        if out:
            Path(out, "weights.sha256").write_text(digest + "\n")
    ck.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
