"""Sharded checkpoints for multi-node jobs (DDP/FSDP under torchrun), written with PyTorch's own
`torch.distributed.checkpoint` (DCP), restored bit for bit.

Usage (examples/train_ddp.py is a complete, tested example)::

    ck = ShardedCheckpointer(model=ddp_model, optimizer=opt, loader=data, every_steps=10, total_steps=200)
    step = ck.restore()                # the same step on every rank (0 on a fresh start)
    ... after each optimizer step:
        if ck.step(step):              # True on every rank at once: saved, exit now
            sys.exit(EXIT_PREEMPTED)

One checkpoint is the folder `<root>/<%012d step>/` on each node, as in `spotrun.checkpoint.format`:

    .metadata  __<rank>_0.distcp ...   DCP's files: each rank writes its own shard
    rank-<rank>.pt                       each rank's RNG states and data position
    MANIFEST.json                        this node's files (format 2: size and a CRC-32 per 8 MiB),
                                         written by its local rank 0 after a barrier (every rank's
                                         shard is in), then the folder is renamed into place

The nodes share no disk: each node's Agent uploads its node's files as one *part* and node 0's
Agent commits the store's MANIFEST (all parts) only when every part is in (spotrun/agent/gang.py).
A relaunched node downloads the whole committed checkpoint, so every rank can read every shard.

Bit for bit means the same arithmetic after a relaunch: with 3+ ranks a gradient all-reduce's
summation order follows DDP's bucket layout, which DDP rebuilds after its first step; build DDP
with `find_unused_parameters=True` (it then keeps its first layout) and fix the CPU thread count
(examples/train_ddp.py does both). Ranks may land on other nodes after a relaunch (c10d assigns
them); every node downloads the whole checkpoint, so any rank reads its own state.

The decision to stop is collective: `step()` all-reduces a "stop" flag (a notice file, SIGTERM or
`request_save()` on any rank), so every rank saves the same step and exits together; a save only
some ranks reach would hang the others in DCP's collectives.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

from spotrun.checkpoint import DEFAULT_ROOT, _SignalHandler, _write_progress, preempting
from spotrun.checkpoint.format import (
    MANIFEST_NAME,
    TMP_PREFIX,
    commit,
    crc_file,
    fsync_dir,
    on_file_threads,
    prune,
    read_manifest,
    step_dirname,
    step_dirs_newest_first,
    verify_checkpoint,
    write_manifest,
)

DCP_METADATA = ".metadata"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def complete_for(path: Path, world_size: int, *, deep: bool = True) -> bool:
    """A local checkpoint this world can load: it verifies against its manifest and holds DCP's
    metadata and every rank's own state (a node-only part, or another world size's, is not).
    ``deep=False`` checks the manifest and the file sizes only, not the digests."""
    if not verify_checkpoint(path, deep=deep):
        return False
    manifest = read_manifest(path)
    if manifest is None:
        return False
    files = manifest["files"]
    return DCP_METADATA in files and all(rank_file(r) in files for r in range(world_size))


def _sync_and_digest(folder: Path) -> list[tuple[Path, str]]:
    """fsync each file of a save folder and digest it (format 2: a CRC-32 per 8 MiB chunk, the
    manifest's unit), on a few threads: a node's shards are hashed at once, not one after another."""

    def one(f: Path) -> tuple[Path, str]:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        return f, crc_file(f)

    return on_file_threads(one, sorted(f for f in folder.iterdir() if f.is_file()))


class ShardedCheckpointer:
    """Saves and restores a distributed training run's full state with DCP. See the module docstring."""

    def __init__(
        self,
        *,
        model: Any,
        optimizer: Any = None,
        loader: Any = None,
        every_steps: int | None = None,
        keep: int | None = None,
        root: str | Path | None = None,
        total_steps: int | None = None,
        handle_signals: bool = True,
    ) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ShardedCheckpointer needs torch.distributed initialized (run under torchrun)")
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.every_steps = every_steps
        self.keep = keep if keep is not None else int(os.environ.get("SPOTRUN_CHECKPOINT_KEEP") or 3)
        self.total_steps = total_steps
        self.root = Path(root or os.environ.get("SPOTRUN_CHECKPOINT_DIR") or DEFAULT_ROOT)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.last_saved_step: int | None = None
        self.restored_from: Path | None = None
        self._progress_file = os.environ.get("SPOTRUN_PROGRESS_FILE") if self.local_rank == 0 else None
        self._progress_at = 0.0
        self._signals: _SignalHandler | None = None
        if handle_signals and threading.current_thread() is threading.main_thread():
            self._signals = _SignalHandler((signal.SIGTERM,))

    # -- collectives --

    def _device(self) -> Any:
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_max(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.optimizer is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    # -- restore --

    def _newest_intact(self) -> int | None:
        """The newest step whose checkpoint is intact on every node (None: none is).

        Every checkpoint on disk is checked cheaply (manifest and sizes); only the newest one all
        ranks hold is re-hashed, once per node (by its local rank 0, the node's ranks share the
        folder), and dropped everywhere if any node finds it torn. Re-hashing every kept
        checkpoint on every rank read each node's disk ``keep x ranks`` times before a load."""
        import torch.distributed as dist

        mine = {int(p.name) for p in step_dirs_newest_first(self.root) if complete_for(p, self.world, deep=False)}
        steps: list[Any] = [None] * self.world
        dist.all_gather_object(steps, sorted(mine))
        common = set(steps[0]).intersection(*steps[1:]) if steps else set()
        while common:
            step = max(common)
            torn = self.local_rank == 0 and not complete_for(self.root / step_dirname(step), self.world)
            if self._all_max(1 if torn else 0) == 0:
                return step
            common.discard(step)
        return None

    def restore(self) -> int:
        """Load the newest checkpoint complete on every rank; the step it holds (0: none)."""
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from spotrun.checkpoint.data import restore_rng

        step = self._newest_intact()
        if step is None:
            return 0
        path = self.root / step_dirname(step)
        state = self._state()
        dcp.load(state, checkpoint_id=str(path))
        if self.optimizer is None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        own = torch.load(path / rank_file(self.rank), map_location="cpu", weights_only=False)
        if self.loader is not None and own.get("loader") is not None:
            self.loader.load_state_dict(own["loader"])
        restore_rng(own["rng"])
        self.restored_from = path
        self.last_saved_step = step
        dist.barrier()
        return int(own["step"])

    # -- save --

    def step(self, step: int) -> bool:
        """After each optimizer step: save when due, or when any rank was told to stop (then True
        on every rank). At `total_steps` it saves and returns False (the run is finished)."""
        self._report_progress(step)
        stop = self._all_max(1 if preempting() else 0) > 0
        final = self.total_steps is not None and step >= self.total_steps
        due = self.every_steps is not None and step % self.every_steps == 0
        if stop or final or due:
            self.save(step)
        return stop and not final

    def save(self, step: int) -> None:
        """Collective: every rank writes its shard and state, then each node commits its folder."""
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        from spotrun.checkpoint.data import capture_rng

        if self.last_saved_step == step:
            return
        token: list[Any] = [secrets.token_hex(4) if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        # the node's ranks share the folder: name it by torchrun's pid (their parent), which makes
        # `format.stale_temp_dirs` drop it once that node's torchrun is gone
        temp = self.root / f"{TMP_PREFIX}{step_dirname(step)}-{os.getppid()}-{token[0]}"
        temp.mkdir(parents=True, exist_ok=True)
        own = {
            "step": step,
            "rng": capture_rng(),
            "loader": self.loader.state_dict() if self.loader is not None else None,
        }
        torch.save(own, temp / rank_file(self.rank))
        dcp.save(self._state(), checkpoint_id=str(temp))
        dist.barrier()  # every rank's shard and state file is on its node's disk
        if self.local_rank == 0:
            files = {f.name: (f.stat().st_size, digest) for f, digest in _sync_and_digest(temp)}
            fsync_dir(temp)
            write_manifest(temp, step, files)
            commit(temp, self.root, step)
            prune(self.root, self.keep)
        dist.barrier()
        self.last_saved_step = step
        self._report_progress(step, force=True)

    def _report_progress(self, step: int, force: bool = False) -> None:
        if self._progress_file is None:
            return
        now = time.monotonic()
        if force or now - self._progress_at >= 1.0:
            self._progress_at = now
            _write_progress(self._progress_file, step, self.total_steps)

    def close(self) -> None:
        if self._signals is not None:
            self._signals.uninstall()
            self._signals = None


__all__ = ["DCP_METADATA", "MANIFEST_NAME", "ShardedCheckpointer", "complete_for", "rank_file"]
