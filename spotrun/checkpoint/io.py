"""Turning training state into checkpoint files and back, at the disk's speed.

A state is a tree of dicts/lists/tuples holding tensors and plain values. The tensors are laid
out end to end (64-byte aligned) in one logical blob, cut into 64 MiB shard files; the tree is
pickled with small references in place of the tensors (`state.pkl`).

* A synchronous save (a preemption, the last step: training is paused anyway) writes straight
  from the live tensors: no staging copy, no buffer to allocate, so the first save in a process
  is as fast as any other (`live_snapshot`).
* A periodic save copies every tensor into one reusable, page-aligned CPU buffer (pinned when
  tensors live on CUDA) and returns; a background thread writes from it (`Stager`).
* Writing (`write_snapshot`): shards are written by a few threads at once with O_DIRECT (no page
  cache copy, no writeback storm) in 8 MiB chunks; each chunk's CRC-32 (for the manifest) is
  computed on a hasher pool while the chunk is written, so the disk never waits for the hash;
  live tensors go through a small page-aligned bounce buffer. Where O_DIRECT is refused (tmpfs,
  some network file systems) the writes are buffered and their writeback started early. A
  periodic save is hashed by BACKGROUND_THREADS threads, and they and its writers run a few nice
  steps below training (not nice 19: on a busy machine that starved them, 0.03x the disk's speed).
* Reading (`read_state`) is one pass: reader threads read each shard once (O_DIRECT when
  possible) into a few reusable bounce buffers and go straight on; one hasher per core computes
  each chunk's CRC and copies the chunk into place -- into the live model's and
  optimizer's own tensors where they match (`into`), so a restore allocates nothing and
  `load_state_dict` copies nothing. A digest that differs raises `TornCheckpointError` before
  anything is returned. Unpickling uses an allow-list of plain types: a checkpoint cannot make the
  loader run arbitrary code.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import hashlib
import io
import mmap
import os
import pickle
import platform
import queue
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotrun.checkpoint.format import CRC_CHUNK, ChunkCRC, crc_digest, entry_digest

STATE_FILE = "state.pkl"
SHARD_BYTES = 64 * 1024 * 1024
_CHUNK = CRC_CHUNK  # reads and writes go a manifest chunk at a time: each chunk's CRC is its own
_ALIGN = 64
_PARALLEL_COPY = 64 * 1024 * 1024  # stage bigger states on every core
_PAGE = 4096  # O_DIRECT alignment of buffers, file offsets and lengths
_STATE_VERSION = 1
_PLAIN = (type(None), bool, int, float, complex, str, bytes)


class _Ref:
    """Stands in the pickled tree for what plain pickle should not carry (tensors, torch types)."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: Any) -> None:
        self.kind, self.value = kind, value

    def __reduce__(self) -> tuple:
        return (_Ref, (self.kind, self.value))


class TornCheckpointError(Exception):
    """A checkpoint's bytes do not match its manifest (found while reading it). `touched`: live
    tensors it was being read into were partly overwritten (see `read_state(into=...)`)."""

    touched = False


@dataclass
class Snapshot:
    """A state ready to write: the pickled tree and the blob's bytes, either staged in one
    page-aligned buffer (`buffer`) or still in the live tensors (`segments`)."""

    meta: bytes
    nbytes: int
    buffer: Any = None  # staged: page-aligned uint8 CPU tensor of >= round_up(nbytes, 4096) bytes
    segments: Any = None  # live: [(blob offset, uint8 1-D tensor view)] ascending


# --- phase 1: stage into memory -------------------------------------------------------------


def _flatten(obj: Any, tensors: list, seen: dict[int, int], path: str) -> Any:
    import numpy as np
    import torch

    if type(obj) in _PLAIN:  # exact types: subclasses (numpy floats, enums) need find_class to load
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_quantized or obj.device.type == "meta":
            raise TypeError(f"cannot checkpoint {path}: only dense tensors are supported")
        if id(obj) not in seen:  # the same tensor twice (tied weights) is stored once
            seen[id(obj)] = len(tensors)
            tensors.append(obj)
        return _Ref("tensor", seen[id(obj)])
    if isinstance(obj, torch.dtype):
        return _Ref("dtype", str(obj).removeprefix("torch."))
    if isinstance(obj, torch.device):
        return _Ref("device", str(obj))
    if isinstance(obj, torch.Size):
        return _Ref("size", tuple(obj))
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"cannot checkpoint {path}: numpy object arrays are not supported")
        return _Ref("ndarray", (obj.dtype.str, obj.shape, obj.tobytes()))
    if isinstance(obj, np.generic):
        return _Ref("npscalar", (obj.dtype.str, obj.tobytes()))
    if isinstance(obj, Mapping):
        out: dict = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[_flatten(k, tensors, seen, f"{path}[{k!r}] (key)")] = _flatten(v, tensors, seen, f"{path}[{k!r}]")
        metadata = getattr(obj, "_metadata", None)  # module state_dict versions, used by load_state_dict
        if isinstance(out, OrderedDict) and metadata is not None:
            out._metadata = _flatten(metadata, tensors, seen, f"{path}._metadata")  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple, set, frozenset):
        return type(obj)(_flatten(v, tensors, seen, f"{path}[{i}]") for i, v in enumerate(obj))
    raise TypeError(
        f"cannot checkpoint {path}: {type(obj).__module__}.{type(obj).__qualname__} is not a tensor, "
        "numpy array, dict, list, tuple, set or plain value"
    )


def _layout(state: Any) -> tuple[bytes, list, list]:
    """Pickle the tree with references for the tensors; return (meta, tensors, [(offset, nbytes)])."""
    tensors: list = []
    skeleton = _flatten(state, tensors, {}, "state")
    metas, places, offset = [], [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        metas.append((offset, nbytes, str(t.dtype).replace("torch.", "", 1), tuple(t.shape)))
        places.append((offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    meta = pickle.dumps(
        {"version": _STATE_VERSION, "shard_bytes": SHARD_BYTES, "nbytes": offset, "tensors": metas, "state": skeleton},
        protocol=5,
    )
    return meta, tensors, places


def check_plain(value: Any, path: str) -> None:
    """Raise TypeError (naming `path`) unless `value` is something a checkpoint can hold."""
    _flatten(value, [], {}, path)


def _bytes_of(t: Any) -> Any:
    """A tensor's bytes as a flat uint8 tensor (a view when it is contiguous)."""
    import torch

    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous().reshape(-1).view(torch.uint8)


def live_snapshot(state: Any) -> Snapshot:
    """A snapshot that writes straight from the tensors: only while training is paused."""
    meta, tensors, places = _layout(state)
    segments = [(off, _bytes_of(t)) for t, (off, nbytes) in zip(tensors, places) if nbytes]  # noqa: B905
    nbytes = -(-(places[-1][0] + places[-1][1]) // _ALIGN) * _ALIGN if places else 0
    return Snapshot(meta=meta, nbytes=nbytes, segments=segments)


def _aligned_empty(nbytes: int, pin: bool) -> Any:
    """A uint8 CPU tensor of `nbytes` whose data starts on a page boundary."""
    import torch

    raw = torch.empty(nbytes + _PAGE, dtype=torch.uint8, pin_memory=pin)
    skip = (-raw.data_ptr()) % _PAGE
    if not pin and HUGE_PAGES:
        _advise_huge(raw.data_ptr() + skip, nbytes)
    return raw[skip : skip + nbytes]


HUGE_PAGES = os.environ.get("SPOTRUN_CHECKPOINT_HUGE_PAGES", "1") != "0"
_HUGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14


def _advise_huge(ptr: int, nbytes: int) -> None:
    """Ask Linux for transparent huge pages over a fresh buffer (where THP is 'madvise'): one fault
    per 2 MiB instead of per 4 KiB when the buffer is first filled. Best effort."""
    start, end = -(-ptr // _HUGE) * _HUGE, (ptr + nbytes) // _HUGE * _HUGE
    if end - start < _HUGE or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


class Stager:
    """Copies states into one reusable page-aligned buffer. One snapshot at a time: the caller must
    be done writing the previous one before staging the next (the buffer is overwritten)."""

    def __init__(self) -> None:
        self._buffer: Any = None

    def release(self) -> None:
        self._buffer = None

    def reserve(self, nbytes: int, cuda: bool = False) -> Any:
        capacity = -(-max(nbytes, 1) // _PAGE) * _PAGE
        buf = self._buffer
        if buf is None or buf.numel() < capacity or (cuda and not buf.is_pinned()):
            self._buffer = None  # free the old one before allocating the new
            self._buffer = _aligned_empty(capacity, cuda)
        return self._buffer

    def stage(self, state: Any) -> Snapshot:
        import torch

        meta, tensors, places = _layout(state)
        nbytes = pickle.loads(meta)["nbytes"]
        cuda_devices = {t.device for t in tensors if t.device.type == "cuda"}
        buf = self.reserve(nbytes, bool(cuda_devices))

        def copy(job: tuple[Any, tuple[int, int]]) -> None:
            t, (off, n) = job
            if n:
                _copy(buf[off : off + n], _bytes_of(t))
            pad = -n % _ALIGN  # zeros, not stale memory, between tensors: the files are deterministic
            if pad:
                ctypes.memset(buf.data_ptr() + off + n, 0, pad)

        jobs = list(zip(tensors, places))  # noqa: B905
        with torch.no_grad():
            if nbytes >= _PARALLEL_COPY and not cuda_devices:  # memmove releases the GIL: use the cores
                with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                    list(pool.map(copy, sorted(jobs, key=lambda j: -j[1][1])))
            else:
                for job in jobs:
                    copy(job)
        for device in cuda_devices:  # the copies above were asynchronous
            torch.cuda.synchronize(device)
        return Snapshot(meta=meta, nbytes=nbytes, buffer=buf)


# --- phase 2: write ---------------------------------------------------------------------------


def _start_writeback() -> Any:
    """sync_file_range(SYNC_FILE_RANGE_WRITE) when the platform has it: start flushing a written
    range now, without waiting, so disk and CPU (hashing) work at the same time."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return lambda fd, off, n: fn(fd, off, n, 2)


_writeback = _start_writeback()
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_IOPRIO_SYSCALL = {"x86_64": 251, "aarch64": 30}.get(platform.machine())


BACKGROUND_NICE = 5  # CPU niceness of background writer threads (0: leave it; 19 starved them on a busy machine)
BACKGROUND_THREADS = 2  # threads hashing a periodic save while training runs (its writers only wait on the disk)


def lower_thread_priority() -> None:
    """Make the calling thread yield to training: BACKGROUND_NICE steps nicer and best-effort I/O
    priority 7 (Linux applies both per thread). Best effort: nothing where not allowed or not Linux."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    if BACKGROUND_NICE:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
        except (OSError, AttributeError):
            pass
    if _IOPRIO_SYSCALL is not None:
        try:
            ctypes.CDLL(None, use_errno=True).syscall(_IOPRIO_SYSCALL, 1, tid, (2 << 13) | 7)
        except (OSError, AttributeError):
            pass


_local = threading.local()


def _bounce() -> tuple[Any, memoryview]:
    """This thread's 8 MiB page-aligned buffer (anonymous mmap) and a uint8 tensor over it."""
    import torch

    if getattr(_local, "bounce", None) is None:
        mm = mmap.mmap(-1, _CHUNK)
        _local.bounce = (torch.frombuffer(mm, dtype=torch.uint8), memoryview(mm))
    return _local.bounce


def _copy(dst: Any, src: Any) -> None:
    """dst[:] = src for flat uint8 tensors: memmove between CPU tensors (torch's copy_ is several
    times slower on byte views, and ctypes releases the GIL), copy_ when CUDA is involved."""
    if dst.device.type == "cpu" and src.device.type == "cpu":
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel())
    else:
        dst.copy_(src, non_blocking=src.device.type == "cuda" and dst.is_pinned())


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _fill(dst: Any, segments: list, starts: list[int], pos: int, n: int) -> None:
    """Copy blob bytes [pos, pos+n) from the live segments into dst[:n]; padding becomes zeros."""
    i = max(0, bisect.bisect_right(starts, pos) - 1)
    cursor = pos
    end = pos + n
    while cursor < end:
        if i >= len(segments) or segments[i][0] >= end:
            dst[cursor - pos : n].zero_()
            return
        off, src = segments[i]
        seg_end = off + src.numel()
        if seg_end <= cursor:
            i += 1
            continue
        if off > cursor:  # padding before this segment
            dst[cursor - pos : off - pos].zero_()
            cursor = off
        upto = min(seg_end, end)
        _copy(dst[cursor - pos : upto - pos], src[cursor - off : upto - off])
        cursor = upto
        i += 1


def _open_for_write(path: Path, allow_direct: bool) -> tuple[int, bool]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if _O_DIRECT and allow_direct:
        try:
            return os.open(path, flags | _O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_shard(
    path: Path, snap: Snapshot, start: int, end: int, hashers: Any = None, allow_direct: bool = True
) -> tuple[int, str]:
    """Write blob bytes [start, end) to `path`, fsynced; return (size, digest for the manifest).

    Each CRC_CHUNK is hashed on `hashers` (a thread pool; in line without one) while this thread
    writes it: both only read the chunk, so the disk does not wait for the hash. From a staged
    buffer the hashes run ahead freely; through the bounce buffer (live tensors) a chunk's hash
    must end before the buffer is refilled."""
    fd, direct = _open_for_write(path, allow_direct)
    size = end - start
    staged = snap.buffer is not None
    if staged:
        src = memoryview(snap.buffer.numpy()).cast("B")
    else:
        bounce, bounce_view = _bounce()
        starts = [off for off, _ in snap.segments]
    crcs: list[Future] = []
    refused = False
    try:
        for pos in range(start, end, _CHUNK):
            n = min(_CHUNK, end - pos)
            padded = -(-n // _PAGE) * _PAGE if direct else n  # O_DIRECT writes whole pages
            if staged:
                chunk = src[pos : pos + padded]
            else:
                if crcs:
                    crcs[-1].result()  # the bounce buffer's previous chunk is hashed: refill it
                _fill(bounce, snap.segments, starts, pos, n)
                if padded > n:
                    bounce[n:padded].zero_()
                chunk = bounce_view[:padded]
            crcs.append(hashers.submit(zlib.crc32, chunk[:n]) if hashers is not None else _done(zlib.crc32(chunk[:n])))
            try:
                _pwrite_all(fd, chunk, pos - start)
            except OSError as e:  # a file system that took O_DIRECT at open but not at write
                if not direct or e.errno != errno.EINVAL:
                    raise
                refused = True
                break
            if not direct and _writeback is not None:
                _writeback(fd, pos - start, n)
        else:
            if direct and size % _PAGE:
                os.ftruncate(fd, size)
            os.fsync(fd)
    finally:
        for f in crcs:  # never leave a hash reading a buffer the caller may reuse
            f.exception()
        os.close(fd)
    if refused:
        os.unlink(path)
        return _write_shard(path, snap, start, end, hashers, allow_direct=False)
    return size, crc_digest(f.result() for f in crcs)


def _write_small(path: Path, data: bytes) -> tuple[int, str]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _pwrite_all(fd, memoryview(data), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    h = ChunkCRC()
    h.update(data)
    return len(data), h.hexdigest()


def writer_threads() -> int:
    """Threads that write and hash shards at once: enough to keep the disk busy while others hash."""
    return max(2, min(4, 2 * (os.cpu_count() or 1)))


def shard_name(i: int) -> str:
    return f"tensors-{i:04d}.bin"


def write_snapshot(
    snap: Snapshot, folder: Path, *, threads: int | None = None, background: bool = False
) -> dict[str, tuple[int, str]]:
    """Write a snapshot's files into `folder` (fsynced); return {relpath: (size, digest)}.
    Writer threads write; one hasher thread per core hashes the chunks as they are written.
    background: BACKGROUND_THREADS hasher threads, writers and hashers at a lower CPU and I/O
    priority."""
    threads = threads or writer_threads()
    initializer = lower_thread_priority if background else None
    hashers = BACKGROUND_THREADS if background else os.cpu_count() or 1
    with ThreadPoolExecutor(hashers, initializer=initializer) as hash_pool:  # noqa: SIM117 (3.9: no parenthesised with)
        with ThreadPoolExecutor(threads, initializer=initializer) as pool:
            futures = {STATE_FILE: pool.submit(_write_small, folder / STATE_FILE, snap.meta)}
            for i, start in enumerate(range(0, snap.nbytes, SHARD_BYTES)):
                end = min(start + SHARD_BYTES, snap.nbytes)
                futures[shard_name(i)] = pool.submit(_write_shard, folder / shard_name(i), snap, start, end, hash_pool)
            return {rel: f.result() for rel, f in futures.items()}


# --- reading back -----------------------------------------------------------------------------

_SAFE_GLOBALS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
    (__name__, "_Ref"),
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which is not allowed")


def _open_for_read(path: Path, direct: bool = True) -> tuple[int, bool]:
    if _O_DIRECT and direct:
        try:
            return os.open(path, os.O_RDONLY | _O_DIRECT), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False


def _kind(entry: dict) -> str:
    return "sha256" if "sha256" in entry else "crc32"


def _digest(data: bytes, entry: dict) -> str:
    if "sha256" in entry:
        return hashlib.sha256(data).hexdigest()
    h = ChunkCRC()
    h.update(data)
    return h.hexdigest()


class _Places:
    """Where each blob byte goes: [(blob offset, nbytes, destination address)], ascending."""

    def __init__(self, places: list[tuple[int, int, int]]) -> None:
        self.places = sorted(p for p in places if p[1])
        self.starts = [off for off, _, _ in self.places]

    def scatter(self, src: int, lo: int, hi: int) -> None:
        """Copy blob bytes [lo, hi), held at address `src`, to their tensors (padding is dropped)."""
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.places) and self.places[i][0] < hi:
            off, nbytes, dst = self.places[i]
            a, b = max(off, lo), min(off + nbytes, hi)
            if a < b:
                ctypes.memmove(dst + a - off, src + a - lo, b - a)  # releases the GIL
            i += 1


class _Bounces:
    """A few reusable page-aligned CHUNK buffers (anonymous mmaps: O_DIRECT-ready, faulted once)
    that chunks pass through: a reader takes one, reads into it, and the hasher that hashes and
    scatters it gives it back. Bounded: readers wait when the hashers fall behind."""

    def __init__(self, count: int) -> None:
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._maps = [mmap.mmap(-1, _CHUNK) for _ in range(count)]
        for mm in self._maps:
            self._free.put(mm)

    def take(self) -> mmap.mmap:
        return self._free.get()

    def give(self, mm: mmap.mmap) -> None:
        self._free.put(mm)

    def close(self) -> None:
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a view still alive (an exception's traceback): the GC frees it
                pass


def _address(mm: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


def _hash_and_scatter(mm: mmap.mmap, n: int, lo: int, places: _Places, bounces: _Bounces, crc: bool) -> int:
    """A chunk just read: its CRC-32 (0 when not checked), and its bytes copied to their tensors."""
    try:
        view = memoryview(mm)[:n]
        value = zlib.crc32(view) if crc else 0  # releases the GIL: one hasher per core in parallel
        view.release()
        places.scatter(_address(mm), lo, lo + n)
        return value
    finally:
        bounces.give(mm)


def _read_shard(
    path: Path, start: int, size: int, places: _Places, bounces: _Bounces, hashers: Any, digest: str | None
) -> Any:
    """Read shard `path` (blob bytes [start, start+size)) chunk by chunk into bounce buffers; each
    chunk is hashed and copied to its tensors on `hashers` while this thread reads the next, so the
    disk always has the readers' requests in flight (hashing in line, read-hash-read, left it idle
    and restore ran at 0.4x the disk's read speed). Returns the shard's digest: the futures of its
    chunk CRCs for format 2 (`_digest_of` joins them), sha256 hex for format 1 (hashed here, in
    order), or "" when digest is None (nothing checked)."""
    sha = hashlib.sha256() if digest == "sha256" else None
    chunks: list[Future] = []
    fd, direct = _open_for_read(path)
    try:
        pos = 0
        while pos < size:
            want = min(_CHUNK, size - pos)
            mm = bounces.take()
            try:
                n = _pread_chunk(fd, mm, pos, -(-want // _PAGE) * _PAGE if direct else want)
            except OSError as e:  # a file system that took O_DIRECT at open but not at read
                bounces.give(mm)
                if not direct or e.errno != errno.EINVAL:
                    raise
                os.close(fd)
                fd, direct = _open_for_read(path, direct=False)
                continue
            except BaseException:
                bounces.give(mm)
                raise
            if n < want:
                bounces.give(mm)
                raise TornCheckpointError(f"{path} is shorter than its manifest says")
            if sha is not None:
                view = memoryview(mm)[:want]
                sha.update(view)
                view.release()
            chunks.append(hashers.submit(_hash_and_scatter, mm, want, start + pos, places, bounces, digest == "crc32"))
            pos += want
    finally:
        os.close(fd)
    if sha is not None:
        for f in chunks:
            f.result()
        return sha.hexdigest()
    return chunks if digest else ("", chunks)


def _pread_chunk(fd: int, mm: mmap.mmap, pos: int, want: int) -> int:
    """Read up to `want` bytes at `pos` into mm; fewer only at the end of the file."""
    got = 0
    while got < want:
        view = memoryview(mm)[got:want]
        try:
            n = os.preadv(fd, [view], pos + got)
        finally:
            view.release()
        if n <= 0:
            break
        got += n
    return got


def _digest_of(result: Any) -> str:
    """A `_read_shard` result as a digest string, once every chunk of it has been scattered."""
    if isinstance(result, str):
        return result
    if isinstance(result, tuple):  # unchecked: wait for the copies, no digest
        for f in result[1]:
            f.result()
        return ""
    return crc_digest(f.result() for f in result)


def match_targets(skeleton: Any, metas: list, live: Any) -> dict[int, Any]:
    """Which saved tensors can be read straight into a live tensor: {tensor index: live tensor}
    where the live tree holds, at the same place, a dense contiguous CPU tensor of the same dtype
    and shape that shares no memory with another target. Reading into them skips allocating (and
    faulting in) the whole state and copying it into the model afterwards."""
    import torch

    found: dict[int, Any] = {}

    def walk(saved: Any, now: Any) -> None:
        if isinstance(saved, _Ref):
            if saved.kind == "tensor" and isinstance(now, torch.Tensor):
                _, nbytes, dtype, shape = metas[saved.value]
                if (
                    now.device.type == "cpu"
                    and now.layout == torch.strided
                    and now.is_contiguous()
                    and not now.is_conj()
                    and not now.is_neg()
                    and str(now.dtype).replace("torch.", "", 1) == dtype
                    and tuple(now.shape) == tuple(shape)
                    and nbytes
                ):
                    found.setdefault(saved.value, now)
            return
        if isinstance(saved, dict) and isinstance(now, Mapping):
            for k, v in saved.items():
                if not isinstance(k, _Ref) and k in now:
                    walk(v, now[k])
        elif type(saved) in (list, tuple) and isinstance(now, (list, tuple)) and len(saved) == len(now):
            for a, b in zip(saved, now):  # noqa: B905
                walk(a, b)

    walk(skeleton, live)
    spans = sorted((t.data_ptr(), t.data_ptr() + metas[i][1], i) for i, t in found.items())
    shared, reach, owner = set(), -1, -1  # targets whose memory overlaps another's: read those apart
    for start, end, i in spans:
        if start < reach:
            shared |= {i, owner}
        if end > reach:
            reach, owner = end, i
    return {i: t for i, t in found.items() if i not in shared}


def read_state(folder: Path, manifest: dict | None = None, *, threads: int | None = None, into: Any = None) -> Any:
    """Load a checkpoint written by `write_snapshot` (tensors on the CPU). With its manifest, every
    byte is checked against the manifest's digest as it is read (one pass): a mismatch raises
    TornCheckpointError and nothing is returned. Without one, nothing is checked.

    `into`: the live tree the state will be loaded into (the model's and optimizer's state_dicts):
    saved tensors that have a live twin (`match_targets`) are read straight into it, and the
    returned tree holds the live tensor there (so `load_state_dict` copies nothing). Live tensors
    are overwritten as the bytes arrive: if the check then fails, the TornCheckpointError has
    `touched` set (they hold a mix of old and new bytes). Every other tensor gets its own memory.

    Each shard is read once (O_DIRECT where the file system allows) by a few reader threads into
    reusable bounce buffers; one hasher thread per core hashes each chunk and copies it into place
    while the readers go on."""
    import torch

    files = (manifest or {}).get("files")
    raw = (folder / STATE_FILE).read_bytes()
    if files is not None:
        entry = files.get(STATE_FILE)
        if entry is None or entry["size"] != len(raw) or _digest(raw, entry) != entry_digest(entry):
            raise TornCheckpointError(f"{folder / STATE_FILE} does not match its manifest")
    meta = _Unpickler(io.BytesIO(raw)).load()
    if not isinstance(meta, dict) or meta.get("version") != _STATE_VERSION:
        raise ValueError(f"{folder / STATE_FILE}: not a spotrun checkpoint state (version {meta.get('version')})")
    total, shard_bytes = meta["nbytes"], meta["shard_bytes"]
    if shard_bytes % _CHUNK:
        raise ValueError(f"{folder / STATE_FILE}: shard size {shard_bytes} is not a multiple of {_CHUNK}")
    shards = [
        (shard_name(i), start, min(start + shard_bytes, total)) for i, start in enumerate(range(0, total, shard_bytes))
    ]
    if files is not None:
        expected = {STATE_FILE} | {name for name, _, _ in shards}
        if set(files) != expected or any(files[name]["size"] != end - start for name, start, end in shards):
            raise TornCheckpointError(f"{folder}: the manifest does not list the files state.pkl describes")
    for offset, nbytes, dtype, shape in meta["tensors"]:
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or offset % _ALIGN or offset + nbytes > total:
            raise ValueError(f"{folder / STATE_FILE}: bad tensor entry {(offset, nbytes, dtype, shape)}")
    live = match_targets(meta["state"], meta["tensors"], into) if into is not None else {}
    tensors = [
        live[i] if i in live else torch.empty(shape, dtype=getattr(torch, dtype))
        for i, (_, _, dtype, shape) in enumerate(meta["tensors"])
    ]
    places = _Places([(off, n, t.data_ptr()) for (off, n, _, _), t in zip(meta["tensors"], tensors)])  # noqa: B905
    readers = threads or writer_threads()
    hashers = os.cpu_count() or 1
    bounces = _Bounces(readers + 2 * hashers)
    try:
        # Exiting the readers' block first lets the hashers finish what was read.
        with ThreadPoolExecutor(hashers) as hash_pool, ThreadPoolExecutor(readers) as read_pool:
            results = {
                name: read_pool.submit(
                    _read_shard,
                    folder / name,
                    start,
                    end - start,
                    places,
                    bounces,
                    hash_pool,
                    _kind(files[name]) if files else None,
                )
                for name, start, end in shards
            }
            try:
                for name, future in results.items():
                    if _digest_of(future.result()) != (entry_digest(files[name]) if files else ""):
                        raise TornCheckpointError(f"{folder / name}: its bytes differ from the manifest's digest")
            except BaseException as e:
                read_pool.shutdown(wait=True, cancel_futures=True)
                if isinstance(e, (TornCheckpointError, OSError)):  # what a caller falls back past
                    e.touched = bool(live)  # type: ignore[union-attr]
                raise
    finally:
        bounces.close()
    return _rebuild(meta["state"], tensors)


def _rebuild(obj: Any, tensors: list) -> Any:
    import numpy as np
    import torch

    if isinstance(obj, _Ref):
        kind, value = obj.kind, obj.value
        if kind == "tensor":
            return tensors[value]
        if kind == "dtype":
            return getattr(torch, value)
        if kind == "device":
            return torch.device(value)
        if kind == "size":
            return torch.Size(value)
        if kind == "ndarray":
            dtype, shape, data = value
            return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()
        if kind == "npscalar":
            dtype, data = value
            return np.frombuffer(data, dtype=np.dtype(dtype))[0]
        raise ValueError(f"unknown reference kind {kind!r} in checkpoint")
    if isinstance(obj, dict):
        out = type(obj)((_rebuild(k, tensors), _rebuild(v, tensors)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple, set, frozenset):
        return type(obj)(_rebuild(v, tensors) for v in obj)
    return obj
