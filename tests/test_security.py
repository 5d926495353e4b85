"""Attacks on what an instance unpacks and what the controller uploads (issue 13, "Security"):
tar path traversal incl. the PATH_MAX symlink trick (CVE-2025-4517), hard links out, devices,
credential files packed by default, files readable by others."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from spotrun.bundle import SECRET_PATTERNS, UnsafeArchive, pack_dir, unpack


def _add(tar: tarfile.TarFile, name: str, kind: bytes, *, linkname: str = "", data: bytes = b"") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o755 if kind in (tarfile.DIRTYPE, tarfile.SYMTYPE) else 0o644
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def cve_2025_4517_archive(path: Path, levels_up: int) -> Path:
    """The public PoC of CVE-2025-4517: nested long folder names behind one-letter links push the
    link chain past PATH_MAX, so `os.path.realpath` (used by tarfile's "data" filter) stops
    resolving and lets a link point `levels_up` folders above the destination; a file is then
    written through that link."""
    comp = "d" * 247
    steps = "abcdefghijklmnop"
    with tarfile.open(path, "w:gz") as tar:
        prefix = ""
        for step in steps:
            _add(tar, os.path.join(prefix, comp), tarfile.DIRTYPE)
            _add(tar, os.path.join(prefix, step), tarfile.SYMTYPE, linkname=comp)
            prefix = os.path.join(prefix, comp)
        linkpath = os.path.join("/".join(steps), "l" * 254)
        _add(tar, linkpath, tarfile.SYMTYPE, linkname="../" * len(steps))
        _add(tar, "escape", tarfile.SYMTYPE, linkname=linkpath + "/.." * levels_up)
        _add(tar, "escape/pwned.txt", tarfile.REGTYPE, data=b"owned\n")
    return path


def _nothing_outside(top: Path, dest: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            p = Path(dirpath, name)
            if dest not in p.parents and p.suffix != ".gz":
                out.append(str(p))
    return out


def test_cve_2025_4517_path_max_symlink_trick_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "work"
    dest.mkdir(parents=True)
    archive = cve_2025_4517_archive(tmp_path / "evil.tar.gz", levels_up=2)
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest)
    assert not (tmp_path / "a" / "pwned.txt").exists()
    assert _nothing_outside(tmp_path, dest) == []


@pytest.mark.parametrize(
    "members",
    [
        [("up", tarfile.SYMTYPE, "../.."), ("up/x.txt", tarfile.REGTYPE, "")],  # write through a link
        [("abs", tarfile.SYMTYPE, "/etc"), ("abs/x.txt", tarfile.REGTYPE, "")],
        [("h", tarfile.LNKTYPE, "../../outside.txt")],  # a hard link to a file outside
        [("h", tarfile.LNKTYPE, "/etc/passwd")],
        [("s", tarfile.SYMTYPE, "t/.."), ("t", tarfile.SYMTYPE, ".")],  # lexically inside, really out
        [("fifo", tarfile.FIFOTYPE, "")],
        [("dev", tarfile.CHRTYPE, "")],
        [("../x.txt", tarfile.REGTYPE, "")],
        [("/tmp/x.txt", tarfile.REGTYPE, "")],
    ],
)
def test_links_and_devices_leaving_the_destination_are_refused(
    tmp_path: Path, members: list[tuple[str, bytes, str]]
) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    dest = tmp_path / "x" / "work"
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, kind, link in members:
            _add(tar, name, kind, linkname=link, data=b"data")
    with pytest.raises(UnsafeArchive):
        unpack(archive, dest)
    assert (tmp_path / "outside.txt").read_text() == "secret"
    assert _nothing_outside(tmp_path, dest) == [str(tmp_path / "outside.txt")]
    for dirpath, _dirs, files in os.walk(dest):
        for name in files:  # a link the archive left behind never leaves the destination
            p = Path(dirpath, name)
            if p.is_symlink():
                assert dest.resolve() in p.resolve().parents or p.resolve() == dest.resolve()


def test_links_inside_and_hard_links_to_own_files_still_work(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _add(tar, "lib/real.py", tarfile.REGTYPE, data=b"x = 1\n")
        _add(tar, "alias.py", tarfile.SYMTYPE, linkname="lib/real.py")
        _add(tar, "lib/up.py", tarfile.SYMTYPE, linkname="../alias.py")
        _add(tar, "copy.py", tarfile.LNKTYPE, linkname="lib/real.py")
    dest = unpack(archive, tmp_path / "w")
    assert (dest / "lib" / "up.py").read_text() == "x = 1\n"
    assert (dest / "copy.py").read_text() == "x = 1\n"


def test_corrupt_archive_is_an_unsafe_archive_not_a_traceback(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a" * 10000)
    packed = pack_dir(src)
    data = bytearray(packed.path.read_bytes())
    for offset in (0, 10, len(data) // 2, len(data) - 5):
        bad = bytearray(data)
        bad[offset] ^= 0xFF
        path = tmp_path / f"bad{offset}.tar.gz"
        path.write_bytes(bytes(bad[: max(offset, 1)] if offset == len(data) // 2 else bad))
        try:
            unpack(path, tmp_path / f"out{offset}")
        except UnsafeArchive:
            pass


def test_unpacked_files_are_private(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "m.py").write_text("m")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    dest = unpack(pack_dir(src).path, tmp_path / "work")
    assert stat.S_IMODE((dest / "pkg" / "m.py").stat().st_mode) == 0o600
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o700
    assert stat.S_IMODE((dest / "pkg").stat().st_mode) == 0o700


SECRETS = {
    ".env": "API_KEY=1",
    ".env.production": "API_KEY=2",
    ".aws/credentials": "[default]",
    ".ssh/id_rsa": "-----BEGIN",
    "deploy/id_ed25519": "k",
    "certs/server.pem": "p",
    "certs/server.key": "k",
    ".netrc": "machine x",
    ".git-credentials": "https://u:p@x",
    ".npmrc": "//registry/:_authToken=x",
    ".pypirc": "[pypi]",
}


def test_credential_files_are_not_packed_by_default_and_can_be_included_deliberately(tmp_path: Path) -> None:
    root = tmp_path / "w"
    for rel, text in {**SECRETS, "train.py": "print(1)", ".env.example": "API_KEY="}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    packed = pack_dir(root)
    with tarfile.open(packed.path) as tar:
        names = set(tar.getnames())
    assert names == {"train.py", ".env.example"}
    assert {".env", ".aws/", ".ssh/", "certs/server.pem", ".netrc", ".git-credentials"} <= set(packed.secrets)
    from spotrun.bundle import secrets_message

    assert ".spotrunignore" in secrets_message(packed.secrets)
    (root / ".spotrunignore").write_text("!certs/server.pem\n")
    with tarfile.open(pack_dir(root).path) as tar:
        assert "certs/server.pem" in tar.getnames()
    assert ".env" in SECRET_PATTERNS


def test_spotrun_home_state_and_store_objects_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spotrun.clouds.store import LocalStore
    from spotrun.control.state import State
    from spotrun.paths import home

    monkeypatch.setenv("SPOTRUN_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir(mode=0o755)
    State.open_default()
    assert stat.S_IMODE(home().stat().st_mode) == 0o700  # tightened even when it existed already
    assert stat.S_IMODE((home() / "state.db").stat().st_mode) == 0o600
    store = LocalStore(tmp_path / "store")
    store.put_bytes("jobs/j/exit", b"{}")
    store.get_file("jobs/j/exit", tmp_path / "copy")
    assert stat.S_IMODE((store.root / "jobs" / "j" / "exit").stat().st_mode) == 0o600
    assert stat.S_IMODE((store.root / "jobs").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o600


def test_a_local_instance_gets_a_minimal_environment_and_secrets_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotrun.clouds.store import open_store
    from spotrun.control.controller import Controller
    from spotrun.control.state import JobStatus, State
    from spotrun.spec import load_spec

    monkeypatch.setenv("CONTROLLER_ONLY_CREDENTIAL", "do-not-leak")
    monkeypatch.setenv("MY_TOKEN", "t0ken")
    (tmp_path / "job.yaml").write_text(
        "name: envcheck\nresources: {providers: [local]}\n"
        'run: env > "$SPOTRUN_OUTPUT_DIR/env.txt"\nenv: {TOKEN: "${MY_TOKEN}"}\n'
    )
    state = State.open_default()
    controller = Controller(state)
    job = controller.submit(load_spec(tmp_path / "job.yaml"))
    assert controller.run(job).status == JobStatus.SUCCEEDED
    seen = open_store(state.job(job).store_url).get_bytes(f"jobs/{job}/outputs/env.txt").decode()
    assert "TOKEN=t0ken" in seen  # the secret, by name
    assert "CONTROLLER_ONLY_CREDENTIAL" not in seen and "do-not-leak" not in seen
