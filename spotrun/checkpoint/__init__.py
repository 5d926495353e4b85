"""Checkpoints for a training script: save everything, resume bit for bit, survive preemption.

Usage (README's "Your training script" is a complete, tested example)::

    from spotrun.checkpoint import EXIT_PREEMPTED, Checkpointer, ResumableLoader

    data = ResumableLoader(DataLoader(ds, batch_size=64, shuffle=True, num_workers=2))
    ck = Checkpointer(model=model, optimizer=opt, scheduler=sched, scaler=None, loader=data,
                      state={"ema": ema, "best": 0.0},  # state_dict()/load_state_dict() objects, plain values
                      every_steps=500, every_seconds=None, keep=3, total_steps=10_000)
    step = ck.restore()                      # steps already done (0 on a fresh start)
    while step < 10_000:
        for x, y in data:                    # picks up mid-epoch, in the same batch order
            ...forward, backward, opt.step(), sched.step(); ck.state["best"] = ...
            step += 1
            if ck.step(step):                # saves when due; True: preempted, state saved
                sys.exit(EXIT_PREEMPTED)
            if step == 10_000:
                break
    ck.close()

What a checkpoint holds: the model, optimizer, scheduler and GradScaler state dicts, the data
position (see `ResumableLoader`: exact for any sampler, or refused when built), everything in
`state=` (objects through their state dicts; plain values — numbers, strings, tensors, numpy
arrays, lists/dicts of them — are put back into `ck.state`), Python/numpy/torch/CUDA RNG states
and the step. A run stopped and resumed from it ends with the same weights, bit for bit, as one
that never stopped. On restore tensors are loaded to the CPU and the state dicts put them where
the model and optimizer live.

`ck.step(step)`, called after each optimizer step with the number of steps done:
  * at `total_steps` it saves synchronously and returns False, even if a notice came in: the
    run is finished, so the script should write its outputs rather than exit to be resumed;
  * after SIGTERM (the handler is installed by the Checkpointer), `request_save()`, or a
    preemption notice in `SPOTRUN_NOTICE_FILE`, it saves synchronously and returns True: exit then
    (`EXIT_PREEMPTED` is the conventional 143). A second SIGTERM kills at once;
  * a periodic save (every `every_steps` steps and/or `every_seconds` seconds) copies the state to
    CPU memory and returns; writing, fsync and commit happen in two background threads running at a
    lower CPU and I/O priority (a few nice steps), one save in flight at a time (a save that falls
    due while one is in flight waits for a later step);
  * it also rewrites `SPOTRUN_PROGRESS_FILE` (about once a second) with {"step", "total", "at"}.
`ck.save(step, sync=True)` saves now, straight from the live tensors (no staging copy);
`ck.wait()` joins a background save; `ck.close()` (or a `with` block) waits and uninstalls the
handler. Errors from a background save are raised by the next `step()`, `save()` or `wait()`.
Periodic saves keep one CPU copy of the state (pinned memory when it lives on CUDA) for reuse
from save to save; `close()` frees it.

On disk (see checkpoint_format): `<root>/<%012d step>/` with `MANIFEST.json` written last; root is
`SPOTRUN_CHECKPOINT_DIR`, else `./checkpoints`. `restore()` loads the newest checkpoint whose
bytes match its manifest's digests (checked as they are read: one pass) and falls back to older
ones; the last `keep` are kept. It reads tensors straight into the model's and optimizer's own
(CPU) tensors where dtype and shape match, so it allocates and copies nothing for them; if a
checkpoint read that way turns out corrupt and no older one loads, it raises CheckpointError
rather than start fresh from half-overwritten weights. This module imports no torch until a
Checkpointer is used, so the Agent can use `verify_checkpoint`, `complete_checkpoints`, `latest_checkpoint` and
`MANIFEST_NAME` freely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotrun.checkpoint.format import (
    MANIFEST_NAME,
    CheckpointError,
    commit,
    complete_checkpoints,
    latest_checkpoint,
    new_temp_dir,
    prune,
    read_manifest,
    remove_tree,
    step_dirname,  # noqa: F401 (re-exported for callers that name checkpoint folders)
    verify_checkpoint,
    write_manifest,
)

if TYPE_CHECKING:
    from spotrun.checkpoint.data import ResumableLoader, ResumableSampler

__all__ = [
    "EXIT_PREEMPTED",
    "MANIFEST_NAME",
    "CheckpointError",
    "Checkpointer",
    "ResumableLoader",
    "ResumableSampler",
    "complete_checkpoints",
    "latest_checkpoint",
    "preempting",
    "read_manifest",
    "request_save",
    "seconds_left",
    "state_hash",
    "verify_checkpoint",
]

log = logging.getLogger("spotrun.checkpoint")

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a scheduler expects from a job that stopped on notice
DEFAULT_ROOT = "checkpoints"
PROGRESS_INTERVAL = 1.0
_NOTICE_POLL = 0.25
_IMPORTED_AT = time.time()

_LAZY = {"ResumableLoader", "ResumableSampler", "capture_rng", "restore_rng"}


def __getattr__(name: str) -> Any:  # torch-backed helpers load on first use (PEP 562)
    if name in _LAZY:
        from spotrun.checkpoint import data as checkpoint_data

        return getattr(checkpoint_data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- preemption: a process-wide request, set by SIGTERM, request_save() or the notice file -------


class _Requests:
    def __init__(self) -> None:
        self.stop = threading.Event()  # save at the next step boundary, then stop
        self.save = threading.Event()  # save at the next step boundary, carry on
        self.notice_checked = 0.0
        self.notice_seen = False


_requests = _Requests()


def _clear_requests() -> None:
    """Forget pending requests and notices (for a process that trains again, e.g. tests)."""
    global _requests
    _requests = _Requests()


def request_save(stop: bool = True) -> None:
    """Make the next `Checkpointer.step()` save synchronously; with stop (the default) it then
    returns True so the script exits, exactly as after SIGTERM. Safe from any thread."""
    (_requests.stop if stop else _requests.save).set()


def _notice() -> dict | None:
    path = os.environ.get("SPOTRUN_NOTICE_FILE")
    if not path:
        return None
    try:
        mtime = os.stat(path).st_mtime
        notice = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(notice, dict):
        return None
    notice["_mtime"] = mtime
    return notice


def _notice_deadline(notice: dict) -> float | None:
    deadline = notice.get("deadline")
    if isinstance(deadline, (int, float)):
        return float(deadline)
    left = notice.get("seconds_left")
    if isinstance(left, (int, float)):
        return notice["_mtime"] + float(left)
    return None


def seconds_left() -> float | None:
    """Seconds until the instance is taken, from `SPOTRUN_NOTICE_FILE`; None without a notice."""
    notice = _notice()
    if notice is None:
        return None
    deadline = _notice_deadline(notice)
    return None if deadline is None else deadline - time.time()


def preempting() -> bool:
    """True once SIGTERM arrived, `request_save()` was called, or a current preemption notice is
    out (written after this process started, or with a deadline still ahead; a leftover notice from
    an earlier attempt is ignored). Cheap enough to call every step: the file is polled at 4 Hz."""
    if _requests.stop.is_set():
        return True
    now = time.time()
    if not _requests.notice_seen and now - _requests.notice_checked >= _NOTICE_POLL:
        _requests.notice_checked = now
        notice = _notice()
        if notice is not None:
            deadline = _notice_deadline(notice)
            _requests.notice_seen = notice["_mtime"] >= _IMPORTED_AT - 1 or (deadline is not None and deadline > now)
    if _requests.notice_seen:
        _requests.stop.set()
    return _requests.stop.is_set()


class _SignalHandler:
    """SIGTERM sets the stop request; a second one restores the old handler and re-raises."""

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.previous: dict[int, Any] = {}
        for sig in signals:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if _requests.stop.is_set():
            signal.signal(signum, self.previous.get(signum) or signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _requests.stop.set()  # no logging here: a handler can interrupt the logging machinery itself

    def uninstall(self) -> None:
        for sig, old in self.previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, old)
        self.previous.clear()


def _write_progress(path: str, step: int, total: int | None) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"step": step, "total": total, "at": time.time()}, f)
    os.replace(tmp, path)


# --- what to save besides the model ------------------------------------------------------------


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _check_state(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """Checkpointer(state=...): objects with state_dict()/load_state_dict(), or plain values
    (numbers, strings, bytes, None, tensors, numpy arrays, and lists/tuples/dicts/sets of them)."""
    if state is None:
        return {}
    if not isinstance(state, Mapping):
        raise TypeError(f"state= takes a dict of name -> object or value, got {type(state).__name__}")
    from spotrun.checkpoint.io import check_plain

    for name, value in state.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"state= names must be non-empty strings, got {name!r}")
        if _stateful(value):
            continue
        if callable(getattr(value, "state_dict", None)):
            raise TypeError(f"state[{name!r}] has state_dict() but no load_state_dict(): it could not be restored")
        check_plain(value, f"state[{name!r}]")  # TypeError naming the key and what is allowed
    return dict(state)


def _read_newest(root: Path, into: Any = None) -> tuple[Path, dict[str, Any]] | None:
    """Read the newest checkpoint whose bytes match its manifest (checked while reading: one
    pass); fall back to older ones past torn or corrupt ones. `into`: the live tree to read
    tensors straight into (`read_state`); if a corrupt checkpoint was partly read into it and no
    older one loads, CheckpointError (the live state is no longer what the script built)."""
    from spotrun.checkpoint.format import step_dirs_newest_first
    from spotrun.checkpoint.io import TornCheckpointError, read_state

    touched: tuple[Path, BaseException] | None = None
    for path in step_dirs_newest_first(root):
        if not verify_checkpoint(path, deep=False):
            log.warning("skipping torn checkpoint %s (manifest or sizes wrong)", path)
            continue
        try:
            return path, read_state(path, read_manifest(path), into=into)
        except (TornCheckpointError, OSError, EOFError) as e:
            log.warning("skipping corrupt checkpoint %s: %s", path, e)
            if getattr(e, "touched", False):
                touched = touched or (path, e)
    if touched is not None:
        path, error = touched
        raise CheckpointError(
            f"{path} is corrupt ({error}); it was partly read into the live model/optimizer before that "
            "showed, and no older checkpoint loads: not starting fresh from half-overwritten state. Move "
            "the corrupt checkpoint away to start from scratch."
        )
    return None


# --- the Checkpointer -------------------------------------------------------------------------


class _FromEnv:
    """Default marker: take the value from the job spec (via the environment), else the built-in."""


FROM_ENV = _FromEnv()


class Checkpointer:
    """Saves and restores a training run's full state. See the module docstring."""

    def __init__(
        self,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        loader: Any = None,
        state: Mapping[str, Any] | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep: int | None | _FromEnv = FROM_ENV,
        root: str | Path | None = None,
        total_steps: int | None = None,
        handle_signals: bool = True,
    ) -> None:
        # The job spec's checkpoint settings reach the script through the environment; arguments win.
        if isinstance(keep, _FromEnv):
            keep = int(os.environ.get("SPOTRUN_CHECKPOINT_KEEP") or 3)
        if every_steps is None and every_seconds is None and os.environ.get("SPOTRUN_CHECKPOINT_INTERVAL"):
            every_seconds = float(os.environ["SPOTRUN_CHECKPOINT_INTERVAL"])
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (or None for all), got {keep}")
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0, got {every_seconds}")
        if loader is not None and not hasattr(loader, "load_state_dict"):
            raise TypeError("loader must be a ResumableLoader (wrap your DataLoader in it, and iterate that)")
        self.state: dict[str, Any] = _check_state(state)
        self.objects = {
            name: obj
            for name, obj in (
                ("model", model),
                ("optimizer", optimizer),
                ("scheduler", scheduler),
                ("scaler", scaler),
                ("loader", loader),
            )
            if obj is not None
        }
        self.every_steps, self.every_seconds, self.keep = every_steps, every_seconds, keep
        self.total_steps = total_steps
        self.root = Path(root or os.environ.get("SPOTRUN_CHECKPOINT_DIR") or DEFAULT_ROOT)
        self.restored_from: Path | None = None
        self.last_saved_step: int | None = None
        self._last_save_step = 0  # the step the interval counts from
        self._last_save_time = time.monotonic()
        self._progress_file = os.environ.get("SPOTRUN_PROGRESS_FILE") or None
        self._progress_at = 0.0
        self._stager: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._signals: _SignalHandler | None = None
        if handle_signals and threading.current_thread() is threading.main_thread():
            self._signals = _SignalHandler((signal.SIGTERM,))

    # -- restore --

    def restore(self) -> int:
        """Load the newest complete checkpoint under root into every object; return its step
        (0 when there is none). Torn checkpoints are skipped; CheckpointError when one was found
        corrupt only after it was partly read into the live tensors and no older one loads."""
        from spotrun.checkpoint.data import restore_rng

        live = {name: obj.state_dict() for name, obj in self.objects.items()}
        live["state"] = {name: value.state_dict() for name, value in self.state.items() if _stateful(value)}
        found = _read_newest(self.root, into=live)
        if found is None:
            log.info("no checkpoint under %s: starting fresh", self.root)
            return 0
        path, state = found
        for name, obj in self.objects.items():
            if name not in state:
                raise CheckpointError(f"{path} holds no {name} state")
            obj.load_state_dict(state[name])
        saved = state.get("state", {})
        missing = [name for name in self.state if name not in saved]
        if missing:
            raise CheckpointError(f"{path} holds no state for {missing} (added to state= after it was written?)")
        for name, value in saved.items():
            if _stateful(self.state.get(name)):
                self.state[name].load_state_dict(value)
            else:
                self.state[name] = value
        restore_rng(state["rng"])
        step = int(state["step"])
        self.restored_from, self.last_saved_step = path, step
        self._last_save_step, self._last_save_time = step, time.monotonic()
        self._report_progress(step, force=True)
        log.info("restored step %d from %s", step, path)
        return step

    # -- the per-step hook --

    def preempting(self) -> bool:
        return preempting()

    def step(self, step: int) -> bool:
        """Call after each optimizer step with the number of steps done. Saves when due; returns
        True when the script should stop (preemption: the state at `step` is then on disk).
        Completion wins over a late notice: at `total_steps` it saves and returns False, so the
        script finishes (writes its outputs) instead of exiting to be resumed for nothing."""
        self._raise_background_error()
        self._report_progress(step)
        if self.total_steps is not None and step >= self.total_steps:
            if self.last_saved_step != step:
                self.save(step, sync=True)
            self._report_progress(step, force=True)
            return False
        if self.preempting():
            if self.last_saved_step != step:
                log.warning("preempted: saving step %d before stopping", step)
                self.save(step, sync=True)
            self._report_progress(step, force=True)
            return True
        if _requests.save.is_set():
            _requests.save.clear()
            self.save(step, sync=True)
        elif self._due(step) and not self._busy():
            self.save(step, sync=False)
        return False

    def _due(self, step: int) -> bool:
        if self.every_steps is not None and step - self._last_save_step >= self.every_steps:
            return True
        return self.every_seconds is not None and time.monotonic() - self._last_save_time >= self.every_seconds

    def _busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _report_progress(self, step: int, force: bool = False) -> None:
        if self._progress_file is None:
            return
        now = time.monotonic()
        if force or now - self._progress_at >= PROGRESS_INTERVAL:
            self._progress_at = now
            try:
                _write_progress(self._progress_file, step, self.total_steps)
            except OSError as e:  # progress is advisory: never stop training for it
                log.warning("cannot write progress file %s: %s", self._progress_file, e)

    # -- save --

    @property
    def extra(self) -> dict[str, Any]:
        """The older name of `state`: plain values of your own, saved and restored with the rest."""
        return self.state

    def tree(self, step: int) -> dict[str, Any]:
        """The tree a checkpoint holds (live tensors: copy before training moves on)."""
        from spotrun.checkpoint.data import capture_rng

        tree = {name: obj.state_dict() for name, obj in self.objects.items()}
        own = {name: value.state_dict() if _stateful(value) else value for name, value in self.state.items()}
        tree.update(step=step, rng=capture_rng(), state=own)
        return tree

    def save(self, step: int, *, sync: bool = True) -> None:
        """Save the state at `step`. sync=True writes straight from the live tensors (training is
        paused: no copy, no buffer to allocate, so a preemption save in a fresh process costs what
        any other does). sync=False copies the state into a reusable CPU buffer, returns, and
        writes in the background at low priority (joining any save still in flight first)."""
        from spotrun.checkpoint.io import Stager, live_snapshot

        self.wait()
        started = time.perf_counter()
        if sync:
            snapshot = live_snapshot(self.tree(step))
        else:
            if self._stager is None:
                self._stager = Stager()
            snapshot = self._stager.stage(self.tree(step))
        staged = time.perf_counter() - started
        self._last_save_step, self._last_save_time = step, time.monotonic()
        temp = new_temp_dir(self.root, step)
        if sync:
            self._write(snapshot, step, temp, staged, started, False)
        else:
            self._thread = threading.Thread(
                target=self._write_background,
                args=(snapshot, step, temp, staged, started, True),
                name=f"spotrun-checkpoint-{step}",
            )
            self._thread.start()

    def _write_background(self, *args: Any) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # surfaced by the next step()/save()/wait()
            self._error = e

    def _write(self, snapshot: Any, step: int, temp: Path, staged: float, started: float, background: bool) -> None:
        from spotrun.checkpoint.io import write_snapshot

        try:
            files = write_snapshot(snapshot, temp, background=background)
            write_manifest(temp, step, files)
            final = commit(temp, self.root, step)
        except BaseException:
            remove_tree(temp)
            raise
        self.last_saved_step = step
        prune(self.root, self.keep)
        elapsed = time.perf_counter() - started
        log.info(
            "checkpoint %s: %.0f MB, staged in %.3f s, committed in %.3f s",
            final.name,
            snapshot.nbytes / 1e6,
            staged,
            elapsed,
        )

    def wait(self) -> None:
        """Block until the background save (if any) is committed; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_background_error()

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"background checkpoint save failed: {error}") from error

    def close(self) -> None:
        """Wait for the save in flight, release the staging buffer, restore the SIGTERM handler."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.release()
            if self._signals is not None:
                self._signals.uninstall()
                self._signals = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- comparing runs ---------------------------------------------------------------------------


def state_hash(model_or_state_dict: Any) -> str:
    """sha256 over a module's (or a flat state dict's) entries in sorted key order: key, dtype,
    shape and raw bytes of each tensor (repr for non-tensors). Equal hashes: bitwise-equal weights."""
    import torch

    sd = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_hash takes a module or a state dict, got {type(sd).__name__}")
    h = hashlib.sha256()
    for key in sorted(sd, key=str):
        value = sd[key]
        h.update(f"{key}\0".encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}\0".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        else:
            h.update(f"{value!r}\0".encode())
    return h.hexdigest()
