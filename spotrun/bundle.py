"""Code and data bundles: a folder packed into a deterministic, content-addressed tar.gz.

The controller packs the job's `workdir` (respecting `.gitignore` and `.spotrunignore` files,
with git's semantics) and each local data path, names the archive by its sha256, and uploads
it once; the Agent unpacks it on the instance. The same content always gives the same bytes
(sorted entries, fixed mtimes, owners and modes, a gzip header without time or name), so an
unchanged workdir or dataset is never sent again.

An archive made from a single file carries a PAX global header `spotrun.kind=file`, so
`unpack` can put that file itself at the target path (a folder archive fills a folder).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

IGNORE_FILES = (".gitignore", ".spotrunignore")  # same folder: .spotrunignore wins (read last)
ALWAYS_IGNORED = (".git/",)
KIND_HEADER = "spotrun.kind"
_BUFFER = 1024 * 1024
Progress = Callable[[int], None]  # called with the number of input bytes just packed


@dataclass(frozen=True)
class Packed:
    sha256: str  # of the .tar.gz file
    path: Path  # the .tar.gz (the caller owns it and deletes it when done)
    size: int  # bytes of the .tar.gz
    files: int  # regular files and symlinks packed
    skipped: list[str] = field(default_factory=list)  # symlinks pointing outside the folder


# --------------------------------------------------------------------------- ignore rules


class _IgnoreRules:
    """gitignore semantics over a tree: nested ignore files, negation, directory patterns.

    Each folder's rules match paths relative to that folder; for a given path the deepest
    folder whose rules say anything (ignore or re-include) decides, as git does.
    """

    def __init__(self, root: Path, extra: Iterable[str]) -> None:
        import pathspec

        self._pathspec = pathspec
        self._specs: dict[str, Any] = {}  # folder relpath ("" = root) -> GitIgnoreSpec
        root_lines = [*ALWAYS_IGNORED, *self._read(root), *extra]
        self._specs[""] = pathspec.GitIgnoreSpec.from_lines(root_lines)

    @staticmethod
    def _read(folder: Path) -> list[str]:
        lines: list[str] = []
        for name in IGNORE_FILES:
            path = folder / name
            if path.is_file():
                lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
        return lines

    def enter(self, root: Path, rel_dir: str) -> None:
        """Load the ignore files of folder `rel_dir` (called once per folder, top-down)."""
        if rel_dir and rel_dir not in self._specs:
            lines = self._read(root / rel_dir)
            if lines:
                self._specs[rel_dir] = self._pathspec.GitIgnoreSpec.from_lines(lines)

    def ignored(self, rel: str, is_dir: bool) -> bool:
        decision = False
        parts = rel.split("/")
        for depth in range(len(parts)):  # root first, deepest last: the last word wins
            base = "/".join(parts[:depth])
            spec = self._specs.get(base)
            if spec is None:
                continue
            sub = "/".join(parts[depth:]) + ("/" if is_dir else "")
            include = spec.check_file(sub).include
            if include is not None:
                decision = include
        return decision


def list_files(root: str | Path, *, extra_ignores: Iterable[str] = (), use_ignore_files: bool = True) -> list[str]:
    """Relative POSIX paths of what `pack_dir` would pack, sorted. Ignored folders are pruned
    (as in git, a file inside an ignored folder cannot be re-included)."""
    root = Path(root)
    rules = _IgnoreRules(root, extra_ignores) if use_ignore_files else None
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        if rules is not None:
            rules.enter(root, rel_dir)
        keep_dirs = []
        for name in sorted(dirnames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = Path(dirpath, name)
            if full.is_symlink():  # a link to a folder is packed as a link, never followed
                filenames.append(name)
                continue
            if rules is None or not rules.ignored(rel, True):
                keep_dirs.append(name)
        dirnames[:] = keep_dirs
        for name in filenames:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if rules is None or not rules.ignored(rel, False):
                out.append(rel)
    return sorted(out)


# --------------------------------------------------------------------------- packing


class _HashingWriter:
    """A file wrapper that hashes and counts what goes through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _tarinfo(name: str, *, size: int = 0, mode: int = 0o644, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.type = kind
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _inside(root: Path, link: Path) -> bool:
    target = (link.parent / os.readlink(link)).resolve()
    real_root = root.resolve()
    return target == real_root or real_root in target.parents


def _write_archive(
    root: Path,
    members: list[str],
    dest: Path,
    *,
    single_file: bool,
    compresslevel: int,
    progress: Progress | None,
) -> Packed:
    skipped: list[str] = []
    count = 0
    with open(dest, "wb") as raw:
        hashing = _HashingWriter(raw)
        # filename="" and mtime=0: the gzip header holds nothing that varies between runs
        with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, compresslevel=compresslevel, mtime=0) as gz:
            headers = {KIND_HEADER: "file" if single_file else "dir"}
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, pax_headers=headers) as tar:
                for rel in members:
                    path = root / rel
                    st = path.lstat()
                    if stat.S_ISLNK(st.st_mode):
                        if not _inside(root, path):
                            skipped.append(rel)
                            continue
                        info = _tarinfo(rel, mode=0o777, kind=tarfile.SYMTYPE)
                        info.linkname = os.readlink(path)
                        tar.addfile(info)
                    elif stat.S_ISREG(st.st_mode):
                        mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
                        with open(path, "rb") as f:
                            tar.addfile(_tarinfo(rel, size=st.st_size, mode=mode), f)
                        if progress is not None:
                            progress(st.st_size)
                    else:
                        continue  # sockets, fifos, devices: not part of a workdir
                    count += 1
    return Packed(hashing.sha.hexdigest(), dest, hashing.size, count, skipped)


def _dest(dest: str | Path | None) -> Path:
    if dest is not None:
        return Path(dest)
    fd, name = tempfile.mkstemp(prefix="spotrun-bundle-", suffix=".tar.gz")
    os.close(fd)
    return Path(name)


def pack_dir(
    path: str | Path,
    *,
    extra_ignores: Iterable[str] = (),
    dest: str | Path | None = None,
    compresslevel: int = 1,
    progress: Progress | None = None,
) -> Packed:
    """Pack a workdir, honouring its `.gitignore`/`.spotrunignore` files (`.git/` always out).

    Every launch packs the workdir to learn its sha256, so speed matters more than the last
    few percent of size: level 1 packs ~3x faster than level 6 for about 4% more bytes."""
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"workdir {root} is not a folder")
    members = list_files(root, extra_ignores=extra_ignores)
    return _write_archive(root, members, _dest(dest), single_file=False, compresslevel=compresslevel, progress=progress)


def pack_path(
    path: str | Path, *, dest: str | Path | None = None, compresslevel: int = 1, progress: Progress | None = None
) -> Packed:
    """Pack a data file or folder as it is (no ignore files)."""
    src = Path(path)
    if src.is_dir():
        members = list_files(src, use_ignore_files=False)
        return _write_archive(
            src, members, _dest(dest), single_file=False, compresslevel=compresslevel, progress=progress
        )
    if src.is_file():
        return _write_archive(
            src.parent, [src.name], _dest(dest), single_file=True, compresslevel=compresslevel, progress=progress
        )
    raise FileNotFoundError(f"data path {src} does not exist")


# --------------------------------------------------------------------------- unpacking


class UnsafeArchive(ValueError):
    """The archive tries to write outside its destination (absolute path, '..', a link out)."""


def _safe_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        name = member.name
        if name.startswith("/") or ".." in Path(name).parts:
            raise UnsafeArchive(f"unsafe path in archive: {name!r}")
        if not (member.isfile() or member.isdir() or member.issym()):
            raise UnsafeArchive(f"unsupported member type in archive: {name!r}")
        yield member


def unpack(tar_gz: str | Path, dest: str | Path) -> Path:
    """Unpack a bundle made by `pack_dir`/`pack_path`; return the path it placed.

    A folder archive is unpacked into the folder `dest`; a single-file archive becomes the
    file `dest` itself. Refuses absolute paths, '..', links leading outside `dest` and device
    files (checked by us, and again by tarfile's "data" filter).
    """
    dest = Path(dest)
    with tarfile.open(tar_gz, mode="r:gz") as tar:
        single = tar.pax_headers.get(KIND_HEADER) == "file"
        target_dir = Path(tempfile.mkdtemp(prefix=".unpack-", dir=_parent(dest))) if single else dest
        target_dir.mkdir(parents=True, exist_ok=True)
        try:
            # filter= exists from 3.12 (and some 3.9-3.11 patch releases); a VM's 3.9 may lack it,
            # and _safe_members already refuses absolute paths, ".." and links
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(target_dir, members=_safe_members(tar), **safe)
        except (tarfile.FilterError, UnsafeArchive) as e:
            if single:
                shutil.rmtree(target_dir, ignore_errors=True)
            raise UnsafeArchive(str(e)) from e
    if not single:
        return dest
    try:
        entries = list(target_dir.iterdir())
        if len(entries) != 1 or not entries[0].is_file():
            raise UnsafeArchive("a single-file archive must hold exactly one file")
        if dest.is_dir():
            raise IsADirectoryError(f"cannot place a single-file archive at {dest}: a folder is there")
        os.replace(entries[0], dest)
    finally:
        shutil.rmtree(target_dir, ignore_errors=True)
    return dest


def _parent(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.parent


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_BUFFER), b""):
            h.update(chunk)
    return h.hexdigest()
