"""What the Agent ships to the Store while the workload runs: logs, heartbeats, checkpoints,
outputs; and the newest valid checkpoint it brings back at start.

Checkpoints travel in the on-disk format of `spotrun.checkpoint.format`: a folder per step named
`%012d`, files first, `MANIFEST.json` last, both on disk and in the store, so a reader that
finds a manifest knows every file it lists was written before it. A download is verified
against its manifest before it is used; a torn or corrupt one is skipped for an older one.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from spotrun.agent import jobfile
from spotrun.checkpoint.format import MANIFEST_NAME, loads_bounded, read_manifest, verify_checkpoint
from spotrun.clock import Clock
from spotrun.clouds.store import NotFound, Store, StoreError

STEP_DIGITS = 12
MAX_LOG_CHUNK = 1024 * 1024

Note = Callable[[str], None]


def step_name(step: int) -> str:
    return f"{step:0{STEP_DIGITS}d}"


def _parse_step(name: str) -> int | None:
    return int(name) if len(name) == STEP_DIGITS and name.isdigit() else None


def _safe_rel(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts


# --------------------------------------------------------------------------- logs


class LogShipper:
    """Merged stdout/stderr, shipped in order as line-preserving chunks `log/%08d`.

    A reader thread feeds bytes; `flush` (about every log_flush_interval, and once more at the
    end with final=True) writes everything up to the last newline as the next chunk. A failed
    write keeps the bytes for the next flush, so nothing is lost or reordered.
    """

    def __init__(self, store: Store, job_prefix: str, attempt: int, *, echo: IO[bytes] | None = None) -> None:
        self.store = store
        self.job_prefix, self.attempt = job_prefix, attempt
        self.echo = echo
        self._buf = bytearray()
        self._lock = threading.Lock()  # guards _buf
        self._flush_lock = threading.Lock()  # one writer at a time keeps the sequence in order
        # an Agent restarted on the same attempt continues the sequence instead of overwriting it
        self.seq = len(store.list(jobfile.log_prefix(job_prefix, attempt)))
        self._reader: threading.Thread | None = None

    def feed(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
        if self.echo is not None:
            try:
                self.echo.write(data)
                self.echo.flush()
            except (OSError, ValueError):
                pass

    def note(self, text: str) -> None:
        """A line from the Agent itself, marked so `spotrun logs` readers can tell."""
        with self._lock:
            prefix = b"" if not self._buf or self._buf.endswith(b"\n") else b"\n"
            line = prefix + f"[spotrun-agent] {text}\n".encode()
            self._buf += line
        if self.echo is not None:
            try:
                self.echo.write(line)
                self.echo.flush()
            except (OSError, ValueError):
                pass

    def start_reader(self, stream: IO[bytes]) -> None:
        def pump() -> None:
            fd = stream.fileno()
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                self.feed(data)

        self._reader = threading.Thread(target=pump, name="spotrun-log-reader", daemon=True)
        self._reader.start()

    def join_reader(self, timeout: float) -> bool:
        """Wait for the pipe's EOF; False if something still holds it open."""
        if self._reader is None:
            return True
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def _take(self, final: bool) -> bytes:
        with self._lock:
            if final:
                end = len(self._buf)
            else:
                end = self._buf.rfind(b"\n") + 1
                if end == 0 and len(self._buf) >= MAX_LOG_CHUNK:
                    end = len(self._buf)  # one endless line: ship it rather than grow forever
            if end > MAX_LOG_CHUNK:
                cut = self._buf.rfind(b"\n", 0, MAX_LOG_CHUNK) + 1
                end = cut or MAX_LOG_CHUNK
            chunk = bytes(self._buf[:end])
            del self._buf[:end]
            return chunk

    def _give_back(self, chunk: bytes) -> None:
        with self._lock:
            self._buf[:0] = chunk

    def flush(self, final: bool = False) -> int:
        """Ship what is buffered (final: also a last partial line). Returns chunks written."""
        written = 0
        with self._flush_lock:
            while True:
                chunk = self._take(final)
                if not chunk:
                    return written
                try:
                    self.store.put_bytes(jobfile.log_key(self.job_prefix, self.attempt, self.seq), chunk)
                except Exception:
                    self._give_back(chunk)
                    raise
                self.seq += 1
                written += 1


# --------------------------------------------------------------------------- heartbeats


def read_progress(path: Path) -> Any:
    """The workload's progress file (the workload writes it: bounded, and a dict or nothing)."""
    try:
        progress = loads_bounded(path.read_bytes(), max_bytes=64 * 1024, max_depth=8)
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None


def heartbeat(phase: str, progress_file: Path, checkpoint_step: int | None, clock: Clock) -> bytes:
    body = {
        "at": clock.now(),
        "phase": phase,
        "progress": read_progress(progress_file),
        "checkpoint_step": checkpoint_step,
    }
    return json.dumps(body).encode()


class Periodic:
    """Calls `fn` every `interval` seconds (real time) in a daemon thread until stopped."""

    def __init__(self, name: str, interval: float, fn: Callable[[], None], on_error: Note) -> None:
        self.interval, self.fn, self.on_error = interval, fn, on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.fn()
            except Exception as e:  # a store hiccup must not kill the thread
                self.on_error(f"{self._thread.name}: {type(e).__name__}: {e}")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


# --------------------------------------------------------------------------- checkpoints


def store_checkpoints(store: Store, job_prefix: str) -> dict[int, set[str]]:
    """step -> relative keys present under `checkpoints/<step>/` in the store."""
    prefix = jobfile.checkpoints_prefix(job_prefix)
    out: dict[int, set[str]] = {}
    for key in store.list(prefix):
        head, _, rel = key[len(prefix) :].partition("/")
        step = _parse_step(head)
        if step is not None and rel:
            out.setdefault(step, set()).add(rel)
    return out


def restore_latest(store: Store, job_prefix: str, dest_root: Path, note: Note) -> int | None:
    """Download the newest store checkpoint that verifies into `dest_root/<step>`; its step."""
    prefix = jobfile.checkpoints_prefix(job_prefix)
    found = store_checkpoints(store, job_prefix)
    for step in sorted(found, reverse=True):
        if MANIFEST_NAME not in found[step]:
            note(f"checkpoint {step} in the store has no manifest (torn upload): skipped")
            continue
        staging = dest_root / ".restore" / step_name(step)  # named by its step, as verify wants
        shutil.rmtree(staging, ignore_errors=True)
        try:
            base = f"{prefix}{step_name(step)}/"
            manifest_bytes = store.get_bytes(base + MANIFEST_NAME)
            staging.mkdir(mode=0o700, parents=True, exist_ok=True)
            (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
            manifest = read_manifest(staging)  # bounded parse: size, depth, types, safe names
            if manifest is None:
                raise ValueError("malformed manifest")
            for rel in sorted(manifest["files"]):
                if not _safe_rel(rel) or rel == MANIFEST_NAME:
                    raise ValueError(f"bad file name in manifest: {rel!r}")
                store.get_file(base + rel, staging / rel)
            ok = verify_checkpoint(staging)
        except (NotFound, StoreError, ValueError, KeyError, TypeError, OSError, RecursionError) as e:
            note(f"checkpoint {step} could not be fetched ({type(e).__name__}: {e}): skipped")
            ok = False
        if not ok:
            note(f"checkpoint {step} does not match its manifest: skipped")
            shutil.rmtree(staging, ignore_errors=True)
            continue
        final = dest_root / step_name(step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        shutil.rmtree(dest_root / ".restore", ignore_errors=True)
        return step
    return None


class CheckpointUploader:
    """Uploads each newly committed local checkpoint (newest first, older ones superseded),
    files first and manifest last, then prunes the store down to `keep` complete ones."""

    def __init__(
        self, store: Store, job_prefix: str, local_root: Path, *, note: Note, keep: int = 3, interval: float = 1.0
    ) -> None:
        self.store, self.job_prefix, self.local_root = store, job_prefix, local_root
        self.keep = max(1, keep)
        self.note = note
        self.interval = interval
        self.uploaded_step: int | None = None  # newest step known complete in the store
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self._bad: set[int] = set()
        self._periodic: Periodic | None = None

    def start(self) -> None:
        self._periodic = Periodic("spotrun-checkpoint-upload", self.interval, self.sync_once, self.note).start()

    def stop(self, *, abort_current: bool = False) -> None:
        """Stop the background thread; abort_current gives up an upload in progress (at the
        next file boundary) so a final `sync_once` can send the newest checkpoint instead."""
        if abort_current:
            self._abort.set()
        if self._periodic is not None:
            self._periodic.stop()
            self._periodic = None
        # The abort stays set until the final `sync_once(final=True)` holds the lock: an upload of a
        # big file may outlive the join above, and must still give up at its next file boundary.

    def _committed(self) -> list[int]:
        try:
            entries = list(os.scandir(self.local_root))
        except FileNotFoundError:
            return []
        steps = []
        for entry in entries:
            step = _parse_step(entry.name)
            if step is not None and entry.is_dir() and os.path.exists(os.path.join(entry.path, MANIFEST_NAME)):
                steps.append(step)
        return sorted(steps, reverse=True)

    def sync_once(self, *, final: bool = False) -> int | None:
        """Upload the newest committed local checkpoint not yet in the store; its step or None.
        `final` is the last upload after `stop()`: it clears an abort once the old upload let go."""
        with self._lock:
            if final:
                self._abort.clear()
            for step in self._committed():
                if self.uploaded_step is not None and step <= self.uploaded_step:
                    return None
                if step in self._bad:
                    continue
                path = self.local_root / step_name(step)
                if not verify_checkpoint(path):
                    self._bad.add(step)
                    self.note(f"local checkpoint {step} does not match its manifest: not uploaded")
                    continue
                try:
                    if not self._upload(step, path):
                        return None  # aborted
                except FileNotFoundError:
                    continue  # pruned locally while we read it: try the next one
                self.uploaded_step = step
                self.note(f"checkpoint {step} uploaded")
                self._prune()
                return step
            return None

    def _upload(self, step: int, path: Path) -> bool:
        manifest = read_manifest(path)
        if manifest is None:
            raise ValueError(f"local checkpoint {step} has a malformed manifest")
        manifest_bytes = (path / MANIFEST_NAME).read_bytes()
        files = manifest["files"]
        base = f"{jobfile.checkpoints_prefix(self.job_prefix)}{step_name(step)}/"
        manifest_key = base + MANIFEST_NAME
        try:
            if self.store.get_bytes(manifest_key) == manifest_bytes:
                return True  # already there (e.g. the checkpoint this attempt restored)
            self.store.delete(manifest_key)  # a different save of this step: un-commit it first
        except NotFound:
            pass
        written: list[str] = []
        try:
            for rel in sorted(files):
                if self._abort.is_set():
                    return False
                if not _safe_rel(rel):
                    raise ValueError(f"bad file name in manifest: {rel!r}")
                written.append(base + rel)
                self.store.put_file(base + rel, path / rel)
            self.store.put_bytes(manifest_key, manifest_bytes)
        except BaseException:
            # A full or failing store: take the half-uploaded step back out (best effort), so
            # torn steps do not pile up; the manifest was never written, so nothing was committed.
            for key in written:
                try:
                    self.store.delete(key)
                except Exception:  # noqa: BLE001, S110 - the store is failing already
                    pass
            raise
        return True

    def _prune(self) -> None:
        found = store_checkpoints(self.store, self.job_prefix)
        complete = sorted((s for s, rels in found.items() if MANIFEST_NAME in rels), reverse=True)
        kept = complete[: self.keep]
        if not kept:
            return
        oldest_kept = kept[-1]
        prefix = jobfile.checkpoints_prefix(self.job_prefix)
        for step, rels in found.items():
            # older complete ones beyond `keep`, and torn ones older than what we keep; a torn
            # one newer than our newest is left alone (it will be overwritten, never loaded)
            if step < oldest_kept or (step in complete and step not in kept):
                base = f"{prefix}{step_name(step)}/"
                if MANIFEST_NAME in rels:
                    self.store.delete(base + MANIFEST_NAME)  # un-commit first
                for rel in sorted(rels - {MANIFEST_NAME}):
                    self.store.delete(base + rel)


# --------------------------------------------------------------------------- outputs


def upload_outputs(store: Store, job_prefix: str, output_dir: Path) -> int:
    """Every regular file under `output_dir` to `jobs/<id>/outputs/<relpath>`; how many."""
    prefix = jobfile.outputs_prefix(job_prefix)
    count = 0
    for dirpath, _dirs, names in os.walk(output_dir):
        for name in sorted(names):
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            store.put_file(prefix + path.relative_to(output_dir).as_posix(), path)
            count += 1
    return count
