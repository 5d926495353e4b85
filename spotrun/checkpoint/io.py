"""Turning training state into checkpoint files and back, fast.

A state is a tree of dicts/lists/tuples holding tensors and plain values. Saving it happens in
two phases so that training waits only for the first:

1. `Stager.stage(state)` (training paused): every tensor is copied into one reusable flat CPU
   buffer (pinned when tensors live on CUDA) at 64-byte aligned offsets, and the tree is pickled
   with small references in place of the tensors. This is a memcpy, not serialization.
2. `write_snapshot(snapshot, folder)` (a background thread is fine): the buffer goes to disk as
   raw bytes, split into 64 MB shards written and hashed by a few threads at once (hashlib and
   os.write release the GIL), each shard's writeback started early with sync_file_range so the
   final fsync has little left to do. Returns each file's size and sha256 for the manifest.

Files: `state.pkl` (the tree; references into the blob) and `tensors-NNNN.bin` (the blob).
`read_state(folder)` loads them back onto the CPU, unpickling with an allow-list of plain
types only: a checkpoint cannot make the loader run arbitrary code.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import pickle
import sys
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "state.pkl"
SHARD_BYTES = 64 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024
_ALIGN = 64
_STATE_VERSION = 1
_PLAIN = (type(None), bool, int, float, complex, str, bytes)


class _Ref:
    """Stands in the pickled tree for what plain pickle should not carry (tensors, torch types)."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: Any) -> None:
        self.kind, self.value = kind, value

    def __reduce__(self) -> tuple:
        return (_Ref, (self.kind, self.value))


@dataclass
class Snapshot:
    """A state copied out of training's way: pickled tree + the first `nbytes` of `buffer`."""

    meta: bytes
    buffer: Any  # torch uint8 CPU tensor, owned by the Stager; valid until the next stage()
    nbytes: int


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


class Stager:
    """Copies states into one reusable buffer. One snapshot at a time: the caller must be done
    writing the previous one before staging the next (the buffer is overwritten)."""

    def __init__(self) -> None:
        self._buffer: Any = None

    def release(self) -> None:
        self._buffer = None

    def stage(self, state: Any) -> Snapshot:
        import torch

        tensors: list = []
        skeleton = _flatten(state, tensors, {}, "state")
        metas, offset = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            metas.append((offset, nbytes, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        cuda_devices = {t.device for t in tensors if t.device.type == "cuda"}
        cuda = bool(cuda_devices)
        buf = self._buffer
        if buf is None or buf.numel() < offset or (cuda and not buf.is_pinned()):
            buf = self._buffer = None  # free the old one before allocating the new
            buf = self._buffer = torch.empty(max(offset, 1), dtype=torch.uint8, pin_memory=cuda)
        with torch.no_grad():
            for t, (off, nbytes, _, shape) in zip(tensors, metas):  # noqa: B905 (3.9)
                if nbytes:
                    dst = buf[off : off + nbytes].view(t.dtype).view(shape)
                    dst.copy_(t, non_blocking=t.device.type == "cuda")
        for device in cuda_devices:  # the copies above were asynchronous
            torch.cuda.synchronize(device)
        meta = pickle.dumps(
            {
                "version": _STATE_VERSION,
                "shard_bytes": SHARD_BYTES,
                "nbytes": offset,
                "tensors": metas,
                "state": skeleton,
            },
            protocol=5,
        )
        return Snapshot(meta=meta, buffer=buf, nbytes=offset)


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


def _write_file(path: Path, data: memoryview) -> tuple[int, str]:
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for start in range(0, len(data), _CHUNK):
            chunk = data[start : start + _CHUNK]
            h.update(chunk)
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
            if _writeback is not None:
                _writeback(fd, start, min(_CHUNK, len(data) - start))
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data), h.hexdigest()


def writer_threads() -> int:
    """Threads that write and hash shards at once: sha256 (~1 GB/s a core) is the CPU cost."""
    return max(1, min(4, os.cpu_count() or 1))


def shard_name(i: int) -> str:
    return f"tensors-{i:04d}.bin"


def write_snapshot(snap: Snapshot, folder: Path, *, threads: int | None = None) -> dict[str, tuple[int, str]]:
    """Write a snapshot's files into `folder` (fsynced); return {relpath: (size, sha256)}."""
    blob = memoryview(snap.buffer.numpy()).cast("B")[: snap.nbytes] if snap.nbytes else memoryview(b"")
    jobs = {STATE_FILE: memoryview(snap.meta)}
    for i, start in enumerate(range(0, snap.nbytes, SHARD_BYTES)):
        jobs[shard_name(i)] = blob[start : start + SHARD_BYTES]
    threads = threads or writer_threads()
    with ThreadPoolExecutor(threads) as pool:
        futures = {rel: pool.submit(_write_file, folder / rel, data) for rel, data in jobs.items()}
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


class _BlobReader:
    """Reads byte ranges of the logical blob (the shards end to end) straight into tensors."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self._fds: dict[int, int] = {}

    def readinto(self, offset: int, dest: memoryview) -> None:
        while dest:
            index, within = divmod(offset, self.shard_bytes)
            if index not in self._fds:
                self._fds[index] = os.open(self.folder / shard_name(index), os.O_RDONLY)
            n = os.preadv(self._fds[index], [dest[: self.shard_bytes - within]], within)
            if n <= 0:
                raise EOFError(f"{self.folder / shard_name(index)} is shorter than its checkpoint says")
            dest, offset = dest[n:], offset + n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def read_state(folder: Path) -> Any:
    """Load a checkpoint written by `write_snapshot` (tensors on the CPU). Verify it first."""
    import torch

    meta = _Unpickler(io.BytesIO((folder / STATE_FILE).read_bytes())).load()
    if not isinstance(meta, dict) or meta.get("version") != _STATE_VERSION:
        raise ValueError(f"{folder / STATE_FILE}: not a spotrun checkpoint state (version {meta.get('version')})")
    reader = _BlobReader(folder, meta["shard_bytes"])
    tensors = []
    try:
        for offset, nbytes, dtype, shape in meta["tensors"]:
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            if nbytes:
                reader.readinto(offset, memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))
            tensors.append(t)
    finally:
        reader.close()
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
