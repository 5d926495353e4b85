"""The emulated cloud VM: a container over the image scripts/build_vm_image.sh builds, running the
provider's unmodified user-data as root, the way cloud-init runs it on a real instance.

The image (cached under $SPOTRUN_VM_CACHE, default /var/cache/spotrun-test) is Debian 11 with its
system python3 3.9 and pip, no venv, no `python`, no cloud CLI, plus a separate PyTorch
environment at /opt/pytorch (python 3.11 + CPU torch, own loader and libraries), like a Deep
Learning image. Each VM gets a fresh overlay of it (`--rootfs DIR:O`: what it writes is gone when
it stops, as a new VM's disk starts from the image), the host's network (`--network host`: the
fakes' metadata services and object stores listen on 127.0.0.1), and the test's "package index"
through /etc/pip.conf: a cp39 wheelhouse the build downloaded (or an unreachable URL, to test a
boot failure).

    vm = start_vm(name, script, env={...}, console=path)   # podman run ... bash user-data
    vm.shutdown(grace=2.0)   # ACPI-like: SIGTERM to every process, then the power is cut
    vm.kill()                # the power is cut at once
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SPOTRUN_VM_CACHE", "/var/cache/spotrun-test"))
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # the discard port: nothing answers


def image_dir() -> Path:
    recipe = hashlib.sha256((ROOT / "scripts" / "build_vm_image.sh").read_bytes()).hexdigest()[:12]
    return CACHE / f"vm-{recipe}"


@functools.cache
def unavailable() -> str | None:
    """Why emulated VMs cannot run here (the tests that need them skip with it); None when they can."""
    if os.environ.get("SPOTRUN_NO_VM"):
        return "SPOTRUN_NO_VM is set"
    if shutil.which("podman") is None or shutil.which("runc") is None:
        return "podman and runc are not installed (make test-services installs them as root)"
    if os.geteuid() != 0:
        return "emulated VMs need root (podman --rootfs overlays)"
    if not (image_dir() / ".ok").exists():
        return f"the VM image is not built at {image_dir()} (make test-services runs scripts/build_vm_image.sh)"
    return None


@dataclass
class VM:
    name: str
    process: subprocess.Popen[bytes]  # the `podman run` client: its exit status is the script's
    console: Path  # what the VM printed (cloud-init's output on the serial console)
    tmp: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def shutdown(self, grace: float) -> None:
        """An OS shutdown (GCE's and Azure's ACPI stop): SIGTERM to every process but init, then,
        `grace` seconds later, the power is cut."""
        if self.alive():
            subprocess.run([*PODMAN, "exec", self.name, "bash", "-c", "kill -TERM -1"], capture_output=True, timeout=30)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.alive():
            subprocess.run([*PODMAN, "kill", self.name], capture_output=True, timeout=30)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            subprocess.run([*PODMAN, "rm", "-f", self.name], capture_output=True, timeout=60)
            self.process.wait(timeout=30)
        subprocess.run([*PODMAN, "rm", "-f", "--ignore", self.name], capture_output=True, timeout=60)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def read_console(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def start_vm(
    name: str,
    script: str,
    *,
    env: dict[str, str],
    console: Path,
    index_url: str | None = None,
    mounts: dict[Path, str] | None = None,
) -> VM:
    """Boot one VM running `script` (the user-data, byte for byte) as root with bash."""
    image = image_dir()
    tmp = Path(tempfile.mkdtemp(prefix=f"vm-{name}-"))
    (tmp / "user-data").write_text(script)
    wheels = image / "wheels"
    if index_url is None:
        pip_conf = f"[global]\nno-index = true\nfind-links = {wheels}\n"
    else:
        pip_conf = f"[global]\nindex-url = {index_url}\n"
    (tmp / "pip.conf").write_text(pip_conf)
    args = [
        *PODMAN,
        "run",
        "--rm",
        "--name",
        name,
        "--network",
        "host",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
        "--hostname",
        name[:60],
        "-v",
        f"{tmp / 'user-data'}:/var/lib/cloud/instance/user-data.txt:ro",
        "-v",
        f"{tmp / 'pip.conf'}:/etc/pip.conf:ro",
        "-v",
        f"{wheels}:{wheels}:ro",
    ]
    mounts = dict(mounts or {})
    for key in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):  # a test CA (e.g. the Key Vault fake's): same path inside
        ca = env.get(key)
        if ca and Path(ca).is_file():
            mounts.setdefault(Path(ca), ca)
    for host, target in mounts.items():
        args += ["-v", f"{host}:{target}:ro"]
    for key in sorted(env):
        args += ["-e", key]  # values through the client's environment
    args += ["--rootfs", f"{image / 'rootfs'}:O", "bash", "/var/lib/cloud/instance/user-data.txt"]
    console.parent.mkdir(parents=True, exist_ok=True)
    with open(console, "ab") as out:
        process = subprocess.Popen(
            args,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return VM(name, process, console, tmp)


def vm_prefix() -> str:
    """The container-name prefix of this test process's VMs (other processes' VMs are not ours)."""
    return f"spotrun-vm-{os.getpid()}-"


def leftover_vms() -> list[str]:
    """This process's VM containers that still exist (running or not): none once an emulator stopped."""
    done = subprocess.run([*PODMAN, "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True, timeout=60)
    return [n for n in done.stdout.split() if n.startswith(vm_prefix())]


def wait_gone(vms: list[VM], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(vm.alive() for vm in vms) and time.monotonic() < deadline:
        time.sleep(0.1)
