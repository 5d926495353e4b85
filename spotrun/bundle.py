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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any
from zlib import error as zlib_error

IGNORE_FILES = (".gitignore", ".spotrunignore")  # same folder: .spotrunignore wins (read last)
ALWAYS_IGNORED = (".git/",)
# Files that hold credentials are never packed by default (a bundle lands in a bucket and on a VM).
# A `!name` line in `.spotrunignore` (or `.gitignore`) packs one deliberately.
SECRET_PATTERNS = (
    ".env",
    ".env.*",
    "!.env.example",
    "!.env.sample",
    "!.env.template",
    ".aws/",
    ".ssh/",
    ".gnupg/",
    ".docker/config.json",
    ".kube/config",
    ".azure/",
    ".config/gcloud/",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    "_netrc",
    ".git-credentials",
    ".npmrc",
    ".pypirc",
    "credentials.json",
    "application_default_credentials.json",
    "service-account*.json",
)
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
    secrets: list[str] = field(default_factory=list)  # credential files left out (SECRET_PATTERNS)


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
        root_lines = [*ALWAYS_IGNORED, *SECRET_PATTERNS, *self._read(root), *extra]
        self._specs[""] = pathspec.GitIgnoreSpec.from_lines(root_lines)
        self._secret = pathspec.GitIgnoreSpec.from_lines(SECRET_PATTERNS)

    def secret(self, rel: str, is_dir: bool) -> bool:
        """Whether `rel` is left out as a credential file (so the caller can say so)."""
        return bool(self._secret.match_file(rel + ("/" if is_dir else "")))

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


def list_files(
    root: str | Path,
    *,
    extra_ignores: Iterable[str] = (),
    use_ignore_files: bool = True,
    secrets: list[str] | None = None,
) -> list[str]:
    """Relative POSIX paths of what `pack_dir` would pack, sorted. Ignored folders are pruned
    (as in git, a file inside an ignored folder cannot be re-included). Credential files left out
    by SECRET_PATTERNS are appended to `secrets` when given."""
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
            elif secrets is not None and rules.secret(rel, True):
                secrets.append(rel + "/")
        dirnames[:] = keep_dirs
        for name in filenames:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if rules is None or not rules.ignored(rel, False):
                out.append(rel)
            elif secrets is not None and rules.secret(rel, False):
                secrets.append(rel)
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
    secrets: list[str] = []
    members = list_files(root, extra_ignores=extra_ignores, secrets=secrets)
    packed = _write_archive(
        root, members, _dest(dest), single_file=False, compresslevel=compresslevel, progress=progress
    )
    return replace(packed, secrets=sorted(secrets))


def secrets_message(secrets: list[str]) -> str:
    """What `launch` says about credential files it left out, and how to pack one deliberately."""
    shown = ", ".join(secrets[:8]) + (f" and {len(secrets) - 8} more" if len(secrets) > 8 else "")
    return (
        f"left out of the code bundle as credentials: {shown} "
        f"(to pack one deliberately, add a line such as '!{secrets[0].rstrip('/')}' to .spotrunignore; "
        "pass secrets with `secret_env` instead)"
    )


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
#
# The one extractor for every archive an instance or the controller unpacks (code bundle, data).
# It never calls `extractall`: each member is created by us, with O_NOFOLLOW/O_EXCL, under folders
# we checked are real folders (never written through a link), and links are created last and
# resolved component by component inside the destination (no `realpath`, whose silent stop at
# ENAMETOOLONG is the CVE-2025-4517 PATH_MAX trick). Files come out 0600 (0700 if executable),
# folders 0700: an unpacked bundle is readable by its owner only.

MAX_NAME = 1024  # bytes of a member name or link target
MAX_LINK_HOPS = 40


class UnsafeArchive(ValueError):
    """The archive tries to write outside its destination (absolute path, '..', a link out),
    holds a device/fifo, or is not a readable archive at all."""


def _member_parts(name: str) -> list[str]:
    if not name or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME or "\x00" in name:
        raise UnsafeArchive(f"unsafe path in archive: {name[:80]!r}")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"unsafe path in archive: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise UnsafeArchive(f"unsafe path in archive: {name!r}")
    return parts


def _real_dir(root: str, parts: list[str], create: bool) -> str:
    """The folder root/parts..., each component a real folder (created 0700 if missing);
    a component that is a link or a file is refused: nothing is ever written through a link."""
    path = root
    for part in parts:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(path, 0o700)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeArchive(f"archive path passes through a link or file: {'/'.join(parts)!r}")
    return path


def _resolve_inside(root: str, parts: list[str]) -> list[str]:
    """Resolve root/parts as the kernel would, one component at a time, refusing any step that
    leaves root (absolute link, '..' above root, too many hops, too long). Returns the parts of
    the resolved path relative to root."""
    todo = list(reversed(parts))
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                raise UnsafeArchive("a link in the archive leads outside its destination")
            done.pop()
            continue
        path = os.path.join(root, *done, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            done.append(part)  # a dangling link inside the destination is harmless
            continue
        except OSError as e:  # ENAMETOOLONG, ELOOP...: never guess
            raise UnsafeArchive(f"a link in the archive cannot be resolved: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            target = os.readlink(path)
            if hops > MAX_LINK_HOPS or target.startswith("/"):
                raise UnsafeArchive("a link in the archive leads outside its destination")
            todo.extend(reversed(target.split("/")))
        else:
            done.append(part)
    return done


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: str, parts: list[str]) -> None:
    parent = _real_dir(root, parts[:-1], create=True)
    path = os.path.join(parent, parts[-1])
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeArchive(f"archive file {member.name!r} would replace a folder")
        os.unlink(path)  # a file or link left by an earlier member: replaced, never followed
    mode = 0o700 if member.mode & 0o100 else 0o600
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as out:
        src = tar.extractfile(member)
        if src is None:
            raise UnsafeArchive(f"archive member {member.name!r} has no data")
        remaining = member.size
        while remaining > 0:
            chunk = src.read(min(_BUFFER, remaining))
            if not chunk:
                raise UnsafeArchive(f"archive member {member.name!r} is truncated")
            out.write(chunk)
            remaining -= len(chunk)


def _extract(tar_gz: str | Path, dest: Path) -> None:
    root = str(dest)
    links: list[tuple[list[str], str]] = []
    files: set[tuple[str, ...]] = set()
    try:
        with tarfile.open(tar_gz, mode="r:gz") as tar:
            for member in tar:
                parts = _member_parts(member.name)
                if member.isdir():
                    _real_dir(root, parts, create=True)
                elif member.isfile():
                    _write_member(tar, member, root, parts)
                    files.add(tuple(parts))
                elif member.issym():
                    if not member.linkname or len(member.linkname) > MAX_NAME or member.linkname.startswith("/"):
                        raise UnsafeArchive(f"link {member.name!r} points outside the archive")
                    links.append((parts, member.linkname))
                elif member.islnk():
                    target = tuple(_member_parts(member.linkname))
                    if target not in files:
                        raise UnsafeArchive(f"hard link {member.name!r} does not name a file of the archive")
                    _copy_inside(root, list(target), parts)
                    files.add(tuple(parts))
                else:
                    raise UnsafeArchive(f"unsupported member type in archive: {member.name!r}")
    except (tarfile.TarError, EOFError, zlib_error) as e:
        raise UnsafeArchive(f"not a readable archive: {e}") from None
    created: list[str] = []
    for parts, target in links:  # last: no file is ever written through a link of the archive
        parent = _real_dir(root, parts[:-1], create=True)
        path = os.path.join(parent, parts[-1])
        if os.path.lexists(path):
            raise UnsafeArchive(f"link {'/'.join(parts)!r} would replace an archive member")
        os.symlink(target, path)
        created.append(path)
    try:  # checked once all exist: a link may lead out only through a link made after it
        for parts, _target in links:
            _resolve_inside(root, parts)
    except UnsafeArchive:
        for path in created:
            os.unlink(path)
        raise


def _copy_inside(root: str, src: list[str], dst: list[str]) -> None:
    src_path = os.path.join(_real_dir(root, src[:-1], create=False), src[-1])
    parent = _real_dir(root, dst[:-1], create=True)
    path = os.path.join(parent, dst[-1])
    if os.path.lexists(path):
        os.unlink(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(src_path, flags), "rb") as s:
        mode = stat.S_IMODE(os.fstat(s.fileno()).st_mode)
        wflags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(path, wflags, mode), "wb") as d:
            shutil.copyfileobj(s, d, _BUFFER)


def unpack(tar_gz: str | Path, dest: str | Path) -> Path:
    """Unpack a bundle made by `pack_dir`/`pack_path`; return the path it placed.

    A folder archive is unpacked into the folder `dest`; a single-file archive becomes the
    file `dest` itself. Refuses absolute paths, '..', links (symbolic or hard) leading outside
    `dest`, writing through a link, device files and fifos (`UnsafeArchive`).
    """
    dest = Path(dest)
    try:
        with tarfile.open(tar_gz, mode="r:gz") as tar:  # the global header comes first: cheap
            single = tar.pax_headers.get(KIND_HEADER) == "file"
    except (tarfile.TarError, EOFError, zlib_error, OSError) as e:
        raise UnsafeArchive(f"not a readable archive: {e}") from None
    if not single:
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        _extract(tar_gz, dest)
        return dest
    target_dir = Path(tempfile.mkdtemp(prefix=".unpack-", dir=_parent(dest)))
    try:
        _extract(tar_gz, target_dir)
        entries = list(target_dir.iterdir())
        if len(entries) != 1 or entries[0].is_symlink() or not entries[0].is_file():
            raise UnsafeArchive("a single-file archive must hold exactly one file")
        if dest.is_dir():
            raise IsADirectoryError(f"cannot place a single-file archive at {dest}: a folder is there")
        os.replace(entries[0], dest)
    finally:
        shutil.rmtree(target_dir, ignore_errors=True)
    return dest


def _parent(dest: Path) -> Path:
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return dest.parent


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_BUFFER), b""):
            h.update(chunk)
    return h.hexdigest()
