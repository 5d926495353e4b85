"""The on-disk checkpoint format, shared by the checkpoint library and the Agent. No torch here.

Under a checkpoint root, one folder per checkpoint, named by its zero-padded step::

    <root>/000000000120/
        state.pkl  tensors-0000.bin  ...   whatever the writer put there
        MANIFEST.json                      written last, after every file was fsynced

    MANIFEST.json = {"format": 2, "step": 120, "created": <epoch>,
                     "files": {"<relpath>": {"size": int, "crc32": "<8 hex digits per 8 MiB>"}}}

Format 2 (what the checkpoint library writes) checks each file with zlib's CRC-32 of every 8 MiB
chunk (`CRC_CHUNK`), the chunks' digests concatenated in order: 2.5x cheaper than sha256 on the
CPU (4.5 vs 1.9 GB/s a core with SHA-NI), which matters because every byte a save writes and a
restore reads is hashed, and sha256 alone was slower than the disk on a busy machine. The digest
guards against accidents (torn writes, truncated copies, flipped bits: a CRC catches every burst of
up to 32 bits and misses other damage with odds of 2^-32 per chunk), which is all sha256 did here
too: the manifest is not signed, so whoever can rewrite a file can rewrite its digest. Format 1
(`"sha256": "<hex>"` per file) is still read and verified, and written by `write_manifest` when
given sha256 digests (other writers, older checkpoints).

A checkpoint is *complete* when its manifest parses, names the folder's own step, and every file
it lists exists with that size and digest. Writers build the folder under a hidden temp name in
the same root (`.tmp-<step>-<pid>-<hex>`), fsync the files, write and fsync the manifest, fsync the
folder, and only then rename it into place: a reader never sees a half-written checkpoint under a
step name, and anything torn (a crash mid-write, a truncated copy, a flipped bit) fails
verification and is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from spotrun.pids import pid_alive

MANIFEST_NAME = "MANIFEST.json"
FORMAT_VERSION = 2  # what write_manifest writes for CRC digests; 1 (sha256) is still read
FORMATS = (1, 2)
CRC_CHUNK = 8 * 1024 * 1024  # format 2: one CRC-32 per this many bytes of a file
CRC_PREFIX = "crc32:"  # a digest string naming format 2's per-chunk CRCs; a bare 64-hex one is sha256
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^\d{12}$")
_HASH_CHUNK = 8 * 1024 * 1024


MAX_JSON_BYTES = 16 * 1024 * 1024  # a manifest of ~100k files; exit records and heartbeats are far smaller
MAX_JSON_DEPTH = 64
_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class CheckpointError(Exception):
    """A checkpoint could not be written or read."""


def loads_bounded(data: bytes | str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> object:
    """`json.loads` for text from a store or a disk spotrun does not trust: ValueError (never
    RecursionError or MemoryError) when it is bigger than `max_bytes`, nested deeper than
    `max_depth`, not UTF-8 or not JSON. NaN and Infinity are refused too."""
    if len(data) > max_bytes:
        raise ValueError(f"JSON document of {len(data)} bytes is over the {max_bytes}-byte limit")
    text = data.decode("utf-8") if isinstance(data, bytes) else data  # UnicodeDecodeError is a ValueError
    if text.count("[") + text.count("{") > max_depth:  # only then can it be too deep: scan
        depth = 0
        for m in _BRACKETS.finditer(text):
            c = m.group()
            if c in "[{":
                depth += 1
                if depth > max_depth:
                    raise ValueError(f"JSON nested deeper than {max_depth} levels")
            elif c in "]}":
                depth -= 1

    def _no_constant(name: str) -> object:
        raise ValueError(f"JSON constant {name} is not allowed")

    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # belt and braces: the scan above should have caught it
        raise ValueError("JSON nested too deeply") from None


def step_dirname(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{step:012d}"


def step_of(path: Path) -> int | None:
    """The step a checkpoint folder is named for; None for anything else (temp folders, files)."""
    name = Path(path).name
    return int(name) if _STEP_DIR.match(name) else None


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def crc_digest(chunk_crcs: Iterable[int]) -> str:
    """Format 2's digest string from the CRC-32 of each CRC_CHUNK of a file, in order."""
    return CRC_PREFIX + "".join(f"{crc:08x}" for crc in chunk_crcs)


class ChunkCRC:
    """Format 2's digest of a byte stream fed in pieces of any size: the CRC-32 of each CRC_CHUNK
    bytes. zlib releases the GIL on big buffers, so threads hash in parallel."""

    __slots__ = ("_crcs", "_crc", "_fill")

    def __init__(self) -> None:
        self._crcs: list[int] = []
        self._crc, self._fill = 0, 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), CRC_CHUNK - self._fill)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._fill += take
            view = view[take:]
            if self._fill == CRC_CHUNK:
                self._crcs.append(self._crc)
                self._crc, self._fill = 0, 0

    def hexdigest(self) -> str:
        """CRC_PREFIX + 8 hex digits per chunk (none for an empty stream)."""
        return crc_digest(self._crcs + [self._crc] if self._fill else self._crcs)


def crc_file(path: Path) -> str:
    h = ChunkCRC()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CRC_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def entry_digest(entry: dict) -> str:
    """A manifest file entry's digest as one string: CRC_PREFIX + chunk CRCs, or sha256 hex."""
    return CRC_PREFIX + entry["crc32"] if "crc32" in entry else entry["sha256"]


def file_digest(path: Path, like: str) -> str:
    """The digest of a file computed the way `like` (a digest string) was: compare the two."""
    return crc_file(path) if like.startswith(CRC_PREFIX) else sha256_file(path)


def _valid_entry(entry: dict, fmt: int) -> bool:
    size = entry.get("size")
    if type(size) is not int or size < 0:
        return False
    if fmt == 1 or "sha256" in entry:
        digest = entry.get("sha256")
        return isinstance(digest, str) and len(digest) == 64 and "crc32" not in entry
    crcs = entry.get("crc32")
    chunks = -(-size // CRC_CHUNK)
    return isinstance(crcs, str) and len(crcs) == 8 * chunks and all(c in "0123456789abcdef" for c in crcs)


def read_manifest(path: Path) -> dict | None:
    """The manifest of a checkpoint folder if it is well formed (not checking the files); else None."""
    path = Path(path)
    try:
        manifest = loads_bounded((path / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        return None
    step, files = manifest.get("step"), manifest.get("files")
    if type(step) is not int or step != step_of(path) or not isinstance(files, dict) or not files:
        return None
    for rel, entry in files.items():
        if not _safe_relpath(rel) or rel == MANIFEST_NAME or not isinstance(entry, dict):
            return None
        if not _valid_entry(entry, manifest["format"]):
            return None
    return manifest


def _safe_relpath(rel: object) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


_T = TypeVar("_T")


def on_file_threads(fn: Callable[..., _T], *items: Sequence) -> list[_T]:
    """``fn`` over whole files (zip of ``items``) on up to 4 threads, results in order: hashlib and
    zlib release the GIL on big buffers, so a checkpoint's files are hashed at once."""
    workers = max(1, min(4, os.cpu_count() or 1, len(items[0])))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, *items))


def verify_checkpoint(path: Path | str, *, deep: bool = True) -> bool:
    """True when the folder is a complete checkpoint. `deep=False` checks the manifest and the file
    sizes only (cheap); the default also re-hashes every file. Never raises."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return False
    files: dict[str, dict] = manifest["files"]
    try:
        for rel, entry in files.items():
            st = os.stat(path / rel)
            if st.st_size != entry["size"]:
                return False
    except OSError:
        return False
    if not deep:
        return True
    rels = sorted(files, key=lambda r: -files[r]["size"])  # biggest first: best spread over threads
    expected = [entry_digest(files[r]) for r in rels]
    try:
        digests = on_file_threads(lambda r, e: file_digest(path / r, e), rels, expected)
    except OSError:
        return False
    return digests == expected


def _step_dirs(root: Path) -> list[Path]:
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    dirs = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and _STEP_DIR.match(e.name)]
    return sorted(dirs, key=lambda p: p.name)


def step_dirs_newest_first(root: Path | str) -> list[Path]:
    """Every folder under root named like a checkpoint, newest first (not verified)."""
    return list(reversed(_step_dirs(Path(root))))


def complete_checkpoints(root: Path | str, *, deep: bool = True) -> list[Path]:
    """Complete checkpoints under root, ascending by step."""
    return [p for p in _step_dirs(Path(root)) if verify_checkpoint(p, deep=deep)]


def latest_checkpoint(root: Path | str) -> Path | None:
    """The newest complete checkpoint under root (fully verified), falling back to older ones."""
    for path in reversed(_step_dirs(Path(root))):
        if verify_checkpoint(path):
            return path
    return None


def _entry(size: int, digest: str) -> dict:
    if digest.startswith(CRC_PREFIX):
        return {"size": size, "crc32": digest[len(CRC_PREFIX) :]}
    return {"size": size, "sha256": digest}


def write_manifest(folder: Path, step: int, files: dict[str, tuple[int, str]]) -> None:
    """Write and fsync the manifest: the commit marker, so it must come after every file is durable.
    files: {relpath: (size, digest)}, a digest from ChunkCRC/crc_file (format 2) or sha256 hex;
    format 1 when every digest is a sha256 (what older readers understand)."""
    entries = {rel: _entry(size, digest) for rel, (size, digest) in sorted(files.items())}
    manifest = {
        "format": FORMAT_VERSION if any("crc32" in e for e in entries.values()) else 1,
        "step": step,
        "created": time.time(),
        "files": entries,
    }
    data = json.dumps(manifest, indent=1).encode()
    fd = os.open(folder / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(folder)


def new_temp_dir(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{TMP_PREFIX}{step_dirname(step)}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def commit(temp: Path, root: Path, step: int) -> Path:
    """Rename a finished temp folder (manifest already written) into place as checkpoint `step`.

    A complete checkpoint already at that step wins (a step is committed once; the Agent may
    already be uploading it) and the temp folder is dropped. A torn one there is replaced."""
    final = root / step_dirname(step)
    if final.exists():
        if verify_checkpoint(final):
            remove_tree(temp)
            return final
        remove_checkpoint(final)
    os.rename(temp, final)
    fsync_dir(root)
    return final


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that no crash midway leaves a step-named folder that is not whole:
    renamed to a temp name first (atomic), then deleted; a crash in between leaves a stale temp
    folder, which the next `prune` removes. Where the rename fails (another file system's rules),
    the manifest goes first, so what is left at least never looks complete."""
    trash = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    except OSError:
        try:
            (path / MANIFEST_NAME).unlink()
            fsync_dir(path)
        except FileNotFoundError:
            pass
        remove_tree(path)
        return
    fsync_dir(path.parent)
    remove_tree(trash)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def stale_temp_dirs(root: Path, in_use: Iterable[Path] = ()) -> list[Path]:
    """Temp folders left by writers that died (their pid is gone) or by this process but not in use."""
    keep = {Path(p).name for p in in_use}
    stale = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for e in entries:
        if not e.name.startswith(TMP_PREFIX) or e.name in keep:
            continue
        parts = e.name[len(TMP_PREFIX) :].split("-")
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if pid is None or pid == os.getpid() or not pid_alive(pid):
            stale.append(Path(e.path))
    return stale


def prune(root: Path, keep: int | None, in_use: Iterable[Path] = ()) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (None: all); delete older ones, torn folders
    older than the newest complete one, and stale temp folders. Returns what was deleted."""
    dirs = _step_dirs(root)
    complete = [p for p in dirs if verify_checkpoint(p, deep=False)]
    doomed: list[Path] = []
    if keep is not None and len(complete) > keep:
        doomed += complete[: len(complete) - keep]
    if complete:
        newest = complete[-1].name
        doomed += [p for p in dirs if p not in complete and p.name < newest]
    for path in doomed:
        remove_checkpoint(path)
    for path in stale_temp_dirs(root, in_use):
        remove_tree(path)
        doomed.append(path)
    return doomed
