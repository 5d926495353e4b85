"""Code/data bundles: deterministic, gitignore-aware packing; safe unpacking."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from spotrun.bundle import UnsafeArchive, list_files, pack_dir, pack_path, unpack


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_same_content_same_sha_whatever_the_mtimes_and_order(tmp_path: Path) -> None:
    a = tree(tmp_path / "a", {"x.py": "print(1)\n", "pkg/m.py": "M", "pkg/z/deep.txt": "d"})
    b = tree(tmp_path / "b", {"pkg/z/deep.txt": "d", "pkg/m.py": "M", "x.py": "print(1)\n"})
    os.utime(b / "x.py", (1, 1))
    (b / "pkg" / "m.py").chmod(0o600)  # group/other bits do not matter, only "executable"
    pa, pb = pack_dir(a), pack_dir(b)
    assert pa.sha256 == pb.sha256 and pa.path.read_bytes() == pb.path.read_bytes()
    assert pa.files == 3 and pa.size == pa.path.stat().st_size
    (b / "x.py").write_text("print(2)\n")
    assert pack_dir(b).sha256 != pa.sha256
    (b / "x.py").write_text("print(1)\n")
    (b / "x.py").chmod(0o755)  # the executable bit is content
    assert pack_dir(b).sha256 != pa.sha256


def test_gitignore_semantics(tmp_path: Path) -> None:
    root = tree(
        tmp_path / "w",
        {
            ".gitignore": "*.log\n!keep.log\nbuild/\n/top.txt\ndata/**/*.bin\n# comment\n",
            "a.log": "",
            "keep.log": "",
            "top.txt": "",
            "sub/top.txt": "",  # /top.txt is anchored to the root
            "build/out.o": "",
            "sub/build/out.o": "",  # build/ matches at any depth
            "data/x/y/w.bin": "",
            "data/x/y/w.txt": "",
            ".git/HEAD": "",  # always out
            "sub/.gitignore": "local.txt\n!a2.log\n",
            "sub/local.txt": "",
            "local.txt": "",  # the nested rule does not reach up
            "sub/a2.log": "",  # re-included by the deeper file
            ".spotrunignore": "secrets/\n!top.txt\n",  # same folder: read after .gitignore, wins
            "secrets/key": "",
            "src/main.py": "",
        },
    )
    assert list_files(root) == [
        ".gitignore",
        ".spotrunignore",
        "data/x/y/w.txt",
        "keep.log",
        "local.txt",
        "src/main.py",
        "sub/.gitignore",
        "sub/a2.log",
        "sub/top.txt",
        "top.txt",
    ]
    assert "src/main.py" not in list_files(root, extra_ignores=["src/"])


def test_files_inside_an_ignored_folder_cannot_be_reincluded(tmp_path: Path) -> None:
    root = tree(tmp_path / "w", {".gitignore": "cache/\n!cache/keep.txt\n", "cache/keep.txt": "", "ok": ""})
    assert list_files(root) == [".gitignore", "ok"]


def test_unpack_round_trip_with_modes_and_links(tmp_path: Path) -> None:
    root = tree(tmp_path / "w", {"run.sh": "#!/bin/sh\n", "lib/a.py": "A"})
    (root / "run.sh").chmod(0o755)
    (root / "link.py").symlink_to("lib/a.py")
    (root / "outside").symlink_to("/etc/passwd")  # points out of the folder: left out, reported
    packed = pack_dir(root)
    assert packed.skipped == ["outside"]
    dest = unpack(packed.path, tmp_path / "out")
    assert (dest / "lib" / "a.py").read_text() == "A"
    assert os.access(dest / "run.sh", os.X_OK)
    assert (dest / "link.py").is_symlink() and (dest / "link.py").read_text() == "A"
    assert not (dest / "outside").exists()


def test_pack_path_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_bytes(b"\x00" * 10)
    placed = unpack(pack_path(tmp_path / "d.bin").path, tmp_path / "data" / "train.bin")
    assert placed.read_bytes() == b"\x00" * 10 and placed.is_file()
    folder = tree(tmp_path / "ds", {".gitignore": "*\n", "a/1.txt": "1"})  # data ignores nothing
    out = unpack(pack_path(folder).path, tmp_path / "data" / "ds")
    assert (out / "a" / "1.txt").read_text() == "1" and (out / ".gitignore").exists()
    with pytest.raises(FileNotFoundError):
        pack_path(tmp_path / "missing")


def _evil(tmp_path: Path, *members: tuple[str, str, str]) -> Path:
    """An archive with (name, kind, content-or-link) members."""
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                data = value.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "members",
    [
        [("../escape.txt", "file", "x")],
        [("/abs.txt", "file", "x")],
        [("a/../../escape.txt", "file", "x")],
        [("up", "link", "../../"), ("up/escape.txt", "file", "x")],
        [("abs", "link", "/tmp"), ("abs/escape.txt", "file", "x")],
    ],
)
def test_unpack_refuses_to_write_outside(tmp_path: Path, members: list[tuple[str, str, str]]) -> None:
    archive = _evil(tmp_path, *members)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest)
    assert not (tmp_path / "deep" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert not Path("/tmp/escape.txt").exists() or time.time() - Path("/tmp/escape.txt").stat().st_mtime > 60


def test_ignore_rules_agree_with_git(tmp_path: Path) -> None:
    """The same tree through `git ls-files --others --exclude-standard` and through list_files."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed: nothing to compare with")
    root = tree(
        tmp_path / "w",
        {
            ".gitignore": "*.log\n!keep.log\nbuild/\n/top.txt\nfoo\n!foo/x\n**/tmp\n*.py[co]\nd1/*\n!d1/keep\n",
            "a.log": "", "keep.log": "", "top.txt": "", "sub/top.txt": "", "build/o": "", "x/build": "",
            "sub/.gitignore": "local.txt\n!a2.log\n/anch\n", "sub/local.txt": "", "local.txt": "",
            "sub/a2.log": "", "sub/anch": "", "sub/q/anch": "", "anch": "", "foo/x": "", "a/tmp/z": "",
            "m.pyc": "", "m.py": "", "d1/a": "", "d1/keep": "", "d1/sub/k": "", "sp ace.txt": "",
        },
    )  # fmt: skip
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    listed = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=root, capture_output=True, text=True, check=True
    )
    assert list_files(root) == sorted(listed.stdout.splitlines())


def test_progress_reports_every_byte(tmp_path: Path) -> None:
    root = tree(tmp_path / "w", {"a": "x" * 1000, "b/c": "y" * 234})
    seen: list[int] = []
    pack_dir(root, progress=seen.append)
    assert sum(seen) == 1234
