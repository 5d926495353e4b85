"""Where the data stands and what the dice will say next: the parts of a training state that are
not tensors in a module. `ResumableLoader` gives a torch DataLoader an exact mid-epoch position;
`capture_rng`/`restore_rng` cover Python's `random`, numpy's global RNG, torch's CPU RNG and,
when CUDA is in use, every CUDA device's RNG.

How a loader is made replayable (see `ResumableLoader`): everything that decides an epoch's
batches must come from state the library can save at the epoch's start and put back. Each
`iter(loader)` draws the workers' base seed from the DataLoader's `generator`, and torch's random
samplers draw their order from their own `generator`; when either is None torch draws from the
*global* RNG instead, at a point a resumed run cannot reproduce (the global RNG is restored to the
checkpoint's step, not to the epoch's start). So the loader and those samplers are given
generators of their own, derived from `torch.initial_seed()`, and their states are saved.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import signal
import sys
from collections.abc import Iterator, Sized
from typing import Any

log = logging.getLogger("spotrun.checkpoint")


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


class NotResumableError(ValueError):
    """A DataLoader whose position the library cannot restore exactly; the message says what to change."""


_PROBE_ITEMS = 4096  # indices compared when probing a custom sampler


def derived_generator(role: str) -> Any:
    """A torch.Generator seeded from `torch.initial_seed()` and `role`: the same in every run of a
    script that seeds torch the same way, different for each role, and never drawn from the global
    RNG (which would shift the script's own random numbers)."""
    import torch

    digest = hashlib.sha256(f"{torch.initial_seed()}/spotrun/{role}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _global_rng_fingerprint() -> tuple:
    import torch

    state: tuple = (random.getstate(), bytes(torch.get_rng_state().numpy()))
    if "numpy" in sys.modules:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state += (kind, keys.tobytes(), pos, has_gauss, gauss)
    return state


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class _Plan:
    """What must be saved at an epoch's start to replay a loader: generators and stateful objects."""

    def __init__(self) -> None:
        self.generators: list[Any] = []
        self.stateful: dict[str, Any] = {}  # "sampler", "batch_sampler", "dataset" -> object

    def add_generator(self, g: Any) -> None:
        if all(g is not h for h in self.generators):
            self.generators.append(g)


def _plan_sampler(sampler: Any, role: str, plan: _Plan) -> None:
    """Make one sampler (or batch sampler) replayable, or raise NotResumableError saying how."""
    import torch
    from torch.utils.data import (
        BatchSampler,
        DistributedSampler,
        RandomSampler,
        SequentialSampler,
        SubsetRandomSampler,
        WeightedRandomSampler,
    )

    if sampler is None or isinstance(sampler, (list, tuple, range, SequentialSampler, DistributedSampler)):
        return  # fixed, or fixed by set_epoch(epoch) (DistributedSampler: seed + epoch)
    if type(sampler) is BatchSampler:
        _plan_sampler(sampler.sampler, role, plan)
        return
    if isinstance(sampler, (RandomSampler, WeightedRandomSampler, SubsetRandomSampler)):
        if sampler.generator is None:  # it would draw a seed from the global RNG each epoch
            sampler.generator = derived_generator(role)
        plan.add_generator(sampler.generator)
        return
    # Someone else's sampler: honour the protocol, then check that nothing else moves it.
    if hasattr(sampler, "generator"):
        if sampler.generator is None:
            sampler.generator = derived_generator(role)
        if isinstance(sampler.generator, torch.Generator):
            plan.add_generator(sampler.generator)
    if _stateful(sampler):
        plan.stateful[role] = sampler
    inner = getattr(sampler, "sampler", None)
    if inner is not None and inner is not sampler:
        _plan_sampler(inner, f"{role}.sampler", plan)
    _probe(sampler, role, plan)


def _probe(sampler: Any, role: str, plan: _Plan) -> None:
    """Iterate a custom sampler twice from the same saved state: it must not touch the global RNGs
    and must yield the same indices both times (else its order depends on something unsaved)."""

    def draw() -> tuple[list, bool]:
        for g, s in zip(plan.generators, gens):  # noqa: B905 (3.9 has no strict=)
            g.set_state(s)
        if role in plan.stateful:
            plan.stateful[role].load_state_dict(saved)
        before = _global_rng_fingerprint()
        items = list(itertools.islice(iter(sampler), _PROBE_ITEMS))
        return items, _global_rng_fingerprint() != before

    gens = [g.get_state() for g in plan.generators]
    saved = plan.stateful[role].state_dict() if role in plan.stateful else None
    rng = capture_rng()
    try:
        first, touched = draw()
        second, _ = draw()
    finally:
        for g, s in zip(plan.generators, gens):  # noqa: B905 (3.9 has no strict=)
            g.set_state(s)
        if saved is not None:
            plan.stateful[role].load_state_dict(saved)
        restore_rng(rng)
    how = (
        "give it a `generator` attribute holding the torch.Generator it draws from (None is replaced by "
        "one of its own), or implement state_dict()/load_state_dict() that save and restore what decides "
        "its next epoch's order"
    )
    if touched:
        raise NotResumableError(
            f"ResumableLoader cannot replay the {role} ({_name(sampler)}): iterating it draws from the global "
            f"random state (torch, random or numpy), which a resumed run cannot rewind to the epoch's start; "
            f"{how}"
        )
    if first != second:
        raise NotResumableError(
            f"ResumableLoader cannot replay the {role} ({_name(sampler)}): iterated twice from the same saved "
            f"state it yields different indices, so its order depends on something the checkpoint does not "
            f"hold; {how}"
        )


class ResumableLoader:
    """Wraps a DataLoader so that its position (epoch, batches consumed) can be saved and restored,
    exactly: a resumed run gets the same batches, with the same random augmentation, as one that
    never stopped.

    Iterate it instead of the loader: each `iter()` runs one epoch, or the rest of an unfinished
    one. A batch counts as consumed once handed out. Resuming mid-epoch replays the epoch's start:

    * the DataLoader's generator and every sampler's generator are put back as they were when the
      epoch began (a loader or torch sampler without one is given one at construction, see
      `derived_generator`); samplers with `set_epoch` (DistributedSampler) get the epoch again;
    * samplers and datasets with `state_dict()`/`load_state_dict()` (the protocol): the sampler's
      state and the dataset's are saved when the epoch begins and loaded before it is replayed, so
      they must decide everything the epoch yields (the dataset's current state is also saved, and
      loaded once the replay is done: a dataset may change between steps, as curricula do);
    * with worker processes the consumed batches are fetched again and dropped, so each worker's
      RNG moves as it did the first time; with `num_workers=0` they are skipped without fetching
      (the main process's RNGs are the checkpoint's, not to be moved). With `persistent_workers`
      a worker's RNG carries over epochs, so the replay starts at the epoch the workers were
      started in: every batch since is fetched again (slow for long runs: prefer
      `persistent_workers=False`).

    Refused at construction (`NotResumableError`, saying what to change): an IterableDataset, a
    loader without `len()`, and a custom sampler that draws from the global RNG or yields a different
    order from the same saved state (it is iterated twice to check). A sampler that draws lazily
    from the global RNG in the middle of an epoch cannot be caught by that check: don't write one.

    With `shield_workers` (the default) the worker processes survive a first SIGTERM sent to the
    whole process group, so that the main process can save (see `_WorkerInit`).
    """

    def __init__(self, loader: Any, *, shield_workers: bool = True) -> None:
        from torch.utils.data import BatchSampler, DataLoader, IterableDataset

        if not isinstance(loader, DataLoader):
            raise TypeError(f"ResumableLoader wraps a torch DataLoader, got {type(loader).__name__}")
        if isinstance(loader.dataset, IterableDataset):
            raise NotResumableError(
                "ResumableLoader needs a map-style dataset (__getitem__ and __len__): an IterableDataset "
                "has no position to return to"
            )
        try:
            len(loader)
        except TypeError as e:
            raise NotResumableError(f"ResumableLoader needs len(loader) (the batches in an epoch): {e}") from None
        plan = _Plan()
        if loader.generator is None:  # its base seed for the workers would come from the global RNG
            loader.generator = derived_generator("loader")  # not a frozen DataLoader attribute
        plan.add_generator(loader.generator)
        bsampler = loader.batch_sampler
        if bsampler is not None and type(bsampler) is not BatchSampler:
            _plan_sampler(bsampler, "batch_sampler", plan)
        else:
            _plan_sampler(loader.sampler, "sampler", plan)
        if _stateful(loader.dataset):
            plan.stateful["dataset"] = loader.dataset
        if shield_workers and loader.num_workers > 0 and not isinstance(loader.worker_init_fn, _WorkerInit):
            loader.worker_init_fn = _WorkerInit(loader.worker_init_fn)  # not a frozen DataLoader attribute
        self.loader = loader
        self.epoch = 0
        self.consumed = 0
        self._plan = plan
        self._persistent = bool(loader.persistent_workers and loader.num_workers > 0)
        self._start: dict[str, Any] | None = None  # what the current epoch began from
        self._first: dict[str, Any] | None = None  # persistent workers: what they were started from
        self._first_epoch = 0
        self._dataset_now: Any = None  # restored dataset state, loaded once the replay is done
        self._live = False  # persistent workers: the DataLoader's workers follow our position
        # Fast path: our sampler under a plain BatchSampler (or used directly, batch_size=None).
        self._fast: tuple[ResumableSampler, int] | None = None
        if type(bsampler) is BatchSampler and isinstance(bsampler.sampler, ResumableSampler):
            self._fast = (bsampler.sampler, bsampler.batch_size)
        elif bsampler is None and isinstance(loader.sampler, ResumableSampler):
            self._fast = (loader.sampler, 1)

    def __len__(self) -> int:
        return len(self.loader)

    # -- what is saved --

    def _capture(self) -> dict[str, Any]:
        return {
            "generators": [g.get_state() for g in self._plan.generators],
            "objects": {name: obj.state_dict() for name, obj in self._plan.stateful.items()},
        }

    def _apply(self, captured: dict[str, Any]) -> None:
        for g, s in zip(self._plan.generators, captured["generators"]):  # noqa: B905 (checked on load)
            g.set_state(s)
        for name, obj in self._plan.stateful.items():
            obj.load_state_dict(captured["objects"][name])

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": 2,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "start": self._start if self._start is not None else self._capture(),
        }
        if self._persistent:
            state["first"] = self._first if self._first is not None else state["start"]
            state["first_epoch"] = self._first_epoch if self._first is not None else self.epoch
        if "dataset" in self._plan.stateful:
            state["dataset_now"] = self._plan.stateful["dataset"].state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 2:
            raise ValueError("this checkpoint's data position was written by an older spotrun: start afresh")
        start = state["start"]
        if len(start["generators"]) != len(self._plan.generators) or set(start["objects"]) != set(self._plan.stateful):
            raise ValueError(
                f"checkpoint holds a data position for {len(start['generators'])} generators and "
                f"{sorted(start['objects'])} stateful objects; this loader has {len(self._plan.generators)} "
                f"and {sorted(self._plan.stateful)}: was the DataLoader built differently?"
            )
        if self._persistent and "first" not in state:
            raise ValueError("this checkpoint was taken without persistent_workers; the DataLoader now has them")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._start = start
        self._first = state.get("first")
        self._first_epoch = int(state.get("first_epoch", 0))
        self._dataset_now = state.get("dataset_now")
        self._live = False

    # -- iterating --

    def __iter__(self) -> Iterator[Any]:
        if self._start is None and (not self._persistent or self._live or self._first is None):
            self._start = self._capture()  # a new epoch, straight after the last one (or the first)
            if self._persistent and self._first is None:
                self._first, self._first_epoch = self._start, self.epoch
            self._live = self._persistent
            return self._run(self.epoch, 0)
        # An epoch restored from a checkpoint, or left part-way: begin it again at its start.
        if "dataset" in self._plan.stateful and self._dataset_now is None:
            self._dataset_now = self._plan.stateful["dataset"].state_dict()  # loaded again after the replay
        if self._persistent:
            return self._replay_persistent()
        assert self._start is not None
        self._apply(self._start)
        return self._run(self.epoch, self.consumed)

    def _set_epoch(self, epoch: int) -> None:
        for s in (self.loader.sampler, self.loader.batch_sampler, getattr(self.loader.batch_sampler, "sampler", None)):
            if hasattr(s, "set_epoch"):  # DistributedSampler and friends
                s.set_epoch(epoch)

    def _open(self, epoch: int, skip: int) -> Iterator[Any]:
        """iter(loader) for `epoch`, past its first `skip` batches, leaving the main process's RNGs
        as they were (they hold the checkpoint's step, which the skipped batches must not move)."""
        self._set_epoch(epoch)
        if self._fast is not None:
            sampler, per_batch = self._fast
            sampler.skip_next(skip * per_batch)
            return iter(self.loader)
        rng = capture_rng() if skip else None
        it = iter(self.loader)
        if skip and self.loader.num_workers == 0 and hasattr(it, "_sampler_iter"):
            for _ in range(skip):  # skip the indices, fetch nothing (the fetches would draw from our RNGs)
                next(it._sampler_iter)
        else:
            for _ in range(skip):  # workers: fetch and drop, so every worker's RNG moves as the first time
                self._next(it)
        if rng is not None:
            restore_rng(rng)
        return it

    def _replay_persistent(self) -> Iterator[Any]:
        """Persistent workers carry their RNG across epochs: start fresh ones from the state they
        were first started from and fetch every batch again up to the position."""
        assert self._first is not None
        target_epoch, target = self.epoch, self.consumed
        target_start = self._start
        self.loader._iterator = None  # drop the old workers (the DataLoader shuts them down)
        self._apply(self._first)  # the workers will copy the dataset as it was when they first started
        rng = capture_rng()
        batches = (target_epoch - self._first_epoch) * len(self.loader) + target
        if batches:
            log.info("persistent_workers: replaying %d batches to restore the workers' RNG", batches)
        for epoch in range(self._first_epoch, target_epoch):
            it = self._open(epoch, 0)
            for _ in range(len(self.loader)):
                self._next(it)
            self._end(it)
        if target_start is None:
            target_start = self._capture()
        elif not _same_generators(self._plan.generators, target_start["generators"]):
            raise RuntimeError(
                "replaying the persistent workers' history did not reach the saved epoch start: a sampler's "
                "order depends on something the checkpoint does not hold"
            )
        for name, obj in self._plan.stateful.items():
            if name != "dataset":
                obj.load_state_dict(target_start["objects"][name])
        it = self._open(target_epoch, target)
        restore_rng(rng)
        self._live = True
        self._start = target_start
        return self._iterate(it, target)

    def _run(self, epoch: int, skip: int) -> Iterator[Any]:
        it = self._open(epoch, skip)
        return self._iterate(it, skip)

    def _iterate(self, it: Iterator[Any], skip: int) -> Iterator[Any]:
        if self._dataset_now is not None:  # replay done: the dataset as it was at the checkpoint
            self._plan.stateful["dataset"].load_state_dict(self._dataset_now)
            self._dataset_now = None
        total = len(self.loader)
        for _ in range(total - skip):
            batch = self._next(it)
            self.consumed += 1
            if self.consumed == total:
                self._end(it)
                self.epoch += 1
                self.consumed = 0
                self._start = None
            yield batch

    def _next(self, it: Iterator[Any]) -> Any:
        try:
            return next(it)
        except StopIteration:
            raise RuntimeError(
                f"the DataLoader ended its epoch early: len(loader) says {len(self.loader)} batches"
            ) from None

    def _end(self, it: Iterator[Any]) -> None:
        # Ask the loader for its end now rather than on the next call: exhausting the sampler may
        # draw from its generator, and a checkpoint taken after the last batch must hold the
        # generator as the next epoch will find it.
        for _ in it:
            raise RuntimeError(f"the DataLoader yielded more batches than len(loader) = {len(self.loader)}")


def _same_generators(generators: list[Any], states: list[Any]) -> bool:
    import torch

    return all(torch.equal(g.get_state(), s) for g, s in zip(generators, states))  # noqa: B905
