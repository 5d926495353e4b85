"""Where the data stands and what the dice will say next: the parts of a training state that are
not tensors in a module. `ResumableLoader` gives a torch DataLoader an exact mid-epoch position;
`capture_rng`/`restore_rng` cover Python's `random`, numpy's global RNG, torch's CPU RNG and,
when CUDA is in use, every CUDA device's RNG.

Why the DataLoader needs its own `generator`: each `iter(loader)` draws the workers' base seed
and (for `shuffle=True`) the epoch's permutation from it, and the workers seed `random`, torch
and numpy from that base seed. Without a generator those draws come from the global torch RNG,
so a run resumed mid-epoch would draw them at a different point of the global stream (changing
the dropout masks of every later step) and could not reproduce the epoch's order.
"""

from __future__ import annotations

import random
import signal
import sys
from collections.abc import Iterator, Sized
from typing import Any


def capture_rng() -> dict[str, Any]:
    """Every global RNG state worth restoring, as a checkpointable tree."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if "numpy" in sys.modules:
        import numpy as np

        state["numpy"] = np.random.get_state()
    # Only when already initialized: asking an unused CUDA for its RNG would start a context.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise RuntimeError("this checkpoint holds CUDA RNG states but CUDA is not available")
        if len(state["cuda"]) != torch.cuda.device_count():
            raise RuntimeError(
                f"this checkpoint holds {len(state['cuda'])} CUDA RNG states, "
                f"this machine has {torch.cuda.device_count()} CUDA devices"
            )
        torch.cuda.set_rng_state_all(state["cuda"])


def _die_on_the_next_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _WorkerInit:
    """A DataLoader `worker_init_fn` that lets the worker outlive its first SIGTERM.

    A preemption SIGTERM usually goes to the whole process group (the Agent, `timeout`, a
    container's init do that). torch's workers die of it, and the main process, told by SIGCHLD,
    raises "DataLoader worker ... is killed by signal" before it reaches the step boundary where
    it would save. Shielded workers keep serving until the main process has saved and shuts them
    down; a second SIGTERM (or the loader's own terminate() on shutdown) ends them as before."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, _die_on_the_next_sigterm)
        if self.inner is not None:
            self.inner(worker_id)


class ResumableSampler:
    """A shuffling sampler that can start an epoch part-way without touching the skipped data.

    Use it as `DataLoader(ds, sampler=ResumableSampler(ds, seed=...), generator=g, ...)` when
    fetching the consumed batches again on resume would be expensive. It draws one `randperm` per
    epoch from its own generator, like `shuffle=True` does. The skipped batches are not loaded, so
    the batches after them reach different workers than in the uninterrupted run: the result is
    exact as long as what a sample becomes does not depend on the history of the worker that
    loads it (no random augmentation drawn from a worker's RNG). With `shuffle=True` instead,
    `ResumableLoader` replays the consumed batches and is exact in every case.
    """

    def __init__(self, data_source: Sized, *, shuffle: bool = True, seed: int = 0, generator: Any = None) -> None:
        import torch

        self.size = len(data_source)
        self.shuffle = shuffle
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self._skip = 0

    def __len__(self) -> int:
        return self.size

    def skip_next(self, count: int) -> None:
        """Drop the first `count` indices of the next epoch (once)."""
        self._skip = count

    def __iter__(self) -> Iterator[int]:
        import torch

        order = torch.randperm(self.size, generator=self.generator).tolist() if self.shuffle else range(self.size)
        skip, self._skip = self._skip, 0
        yield from order[skip:]


class ResumableLoader:
    """Wraps a DataLoader so that its position (epoch, batches consumed) can be saved and restored.

    Iterate it instead of the loader: each `iter()` runs one epoch, or the rest of an unfinished
    one. The position is taken at batch granularity: a batch counts as consumed once handed out.
    Requirements (checked): a map-style dataset, `generator=` given to the DataLoader, no
    `persistent_workers`, and `len(loader)` equal to the number of batches an epoch yields.
    With `shield_workers` (the default) the loader's worker processes survive a first SIGTERM
    sent to the whole process group, so that the main process can save (see `_WorkerInit`).
    """

    def __init__(self, loader: Any, *, shield_workers: bool = True) -> None:
        from torch.utils.data import BatchSampler, DataLoader, IterableDataset

        if not isinstance(loader, DataLoader):
            raise TypeError(f"ResumableLoader wraps a torch DataLoader, got {type(loader).__name__}")
        if isinstance(loader.dataset, IterableDataset):
            raise ValueError("ResumableLoader needs a map-style dataset (an IterableDataset has no position)")
        if loader.generator is None:
            raise ValueError(
                "give the DataLoader its own generator, e.g. generator=torch.Generator().manual_seed(0): "
                "without one, shuffling and worker seeds come from the global RNG and cannot be replayed"
            )
        if loader.persistent_workers:
            raise ValueError("persistent_workers=True is not resumable exactly (worker seeds depend on history)")
        if shield_workers and loader.num_workers > 0 and not isinstance(loader.worker_init_fn, _WorkerInit):
            loader.worker_init_fn = _WorkerInit(loader.worker_init_fn)  # not a frozen DataLoader attribute
        self.loader = loader
        self.epoch = 0
        self.consumed = 0
        self._start_states: list | None = None  # generator states when the current epoch began
        bsampler = loader.batch_sampler
        self._generators = [loader.generator]
        for s in (loader.sampler, getattr(bsampler, "sampler", None)):
            g = getattr(s, "generator", None)
            if g is not None and all(g is not h for h in self._generators):
                self._generators.append(g)
        # Fast path: our sampler under a plain BatchSampler (or used directly, batch_size=None).
        self._fast: tuple[ResumableSampler, int] | None = None
        if type(bsampler) is BatchSampler and isinstance(bsampler.sampler, ResumableSampler):
            self._fast = (bsampler.sampler, bsampler.batch_size)
        elif bsampler is None and isinstance(loader.sampler, ResumableSampler):
            self._fast = (loader.sampler, 1)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        states = self._start_states if self._start_states is not None else [g.get_state() for g in self._generators]
        return {"epoch": self.epoch, "consumed": self.consumed, "generators": list(states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["generators"]) != len(self._generators):
            raise ValueError(
                f"checkpoint holds {len(state['generators'])} data generator states, this loader uses "
                f"{len(self._generators)}"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._start_states = list(state["generators"])

    def __iter__(self) -> Iterator[Any]:
        if self._start_states is None:
            self._start_states = [g.get_state() for g in self._generators]
        else:  # an epoch restored from a checkpoint or left part-way: begin it again at its start
            for g, s in zip(self._generators, self._start_states):  # noqa: B905 (3.9)
                g.set_state(s)
        return self._run(self.consumed)

    def _run(self, skip: int) -> Iterator[Any]:
        total = len(self.loader)
        for s in (self.loader.sampler, getattr(self.loader.batch_sampler, "sampler", None)):
            if hasattr(s, "set_epoch"):  # DistributedSampler and friends
                s.set_epoch(self.epoch)
        if self._fast is not None:
            sampler, per_batch = self._fast
            sampler.skip_next(skip * per_batch)
            it = iter(self.loader)
        else:
            it = iter(self.loader)
            for _ in range(skip):  # replay: fetch and drop, so every RNG moves as it did the first time
                self._next(it)
        for _ in range(total - skip):
            batch = self._next(it)
            self.consumed += 1
            if self.consumed == total:
                self._finish_epoch(it)
            yield batch

    def _next(self, it: Iterator[Any]) -> Any:
        try:
            return next(it)
        except StopIteration:
            raise RuntimeError(
                f"the DataLoader ended its epoch early: len(loader) says {len(self.loader)} batches"
            ) from None

    def _finish_epoch(self, it: Iterator[Any]) -> None:
        # Ask the loader for its end now rather than on the next call: exhausting the sampler may
        # draw from the generator (RandomSampler does), and a checkpoint taken after the last
        # batch must hold the generator as the next epoch will find it.
        for _ in it:
            raise RuntimeError(f"the DataLoader yielded more batches than len(loader) = {len(self.loader)}")
        self.epoch += 1
        self.consumed = 0
        self._start_states = None
