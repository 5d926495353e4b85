"""Everything a cloud VM imports runs on the image's own Python 3.9 (issue 11): the Agent, the notice
watchers, the store clients, the checkpoint format, the bootstrap program. Compiled and imported by
the emulated image's real python3 (Debian 11's 3.9), so a 3.10+ construct (StrEnum,
Popen(process_group=), zip(strict=), match, X | Y at runtime, tarfile filter=) fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes import vm_image

ROOT = Path(__file__).resolve().parents[1]

VM_MODULES = [
    "spotrun.agent.main",
    "spotrun.agent.fetch",
    "spotrun.agent.sync",
    "spotrun.agent.workload",
    "spotrun.agent.notice",
    "spotrun.agent.jobfile",
    "spotrun.clouds",
    "spotrun.clouds.base",
    "spotrun.clouds.store",
    "spotrun.clouds.vmboot",
    "spotrun.clouds.aws.notice",
    "spotrun.clouds.aws.store",
    "spotrun.clouds.gcp.notice",
    "spotrun.clouds.gcp.store",
    "spotrun.clouds.azure.notice",
    "spotrun.clouds.azure.store",
    "spotrun.checkpoint",
    "spotrun.checkpoint.format",
    "spotrun.bundle",
]

PROBE = """
import importlib, sys
assert sys.version_info[:2] == (3, 9), sys.version
for name in sys.argv[1:]:
    importlib.import_module(name)
from spotrun.clouds.base import InstanceStatus
assert f"{InstanceStatus.RUNNING}" == "running" and InstanceStatus("preempted") is InstanceStatus.PREEMPTED
from spotrun.agent.workload import own_process_group
import subprocess
child = subprocess.run(["sh", "-c", "ps -o pgid= $$ 2>/dev/null || cat /proc/$$/stat"], **own_process_group())
print("VM-SIDE-OK", len(sys.argv) - 1)
"""


def run_in_vm(tmp_path: Path, script: str, env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    why = vm_image.unavailable()
    if why:
        pytest.skip(why)
    console = tmp_path / "console.log"
    vm = vm_image.start_vm(
        f"spotrun-probe-{tmp_path.name}"[:60], "#!/bin/bash\n" + script, env=env, console=console, mounts={ROOT: "/src"}
    )
    try:
        code = vm.process.wait(timeout=timeout)
    finally:
        vm.kill()
    return code, console.read_text()


def test_the_vm_side_imports_on_the_images_python39(tmp_path: Path) -> None:
    code, out = run_in_vm(
        tmp_path, 'cd /src && PYTHONPATH=/src python3 -c "$PROBE" ' + " ".join(VM_MODULES), {"PROBE": PROBE}
    )
    assert code == 0, out
    assert f"VM-SIDE-OK {len(VM_MODULES)}" in out


def test_the_image_is_what_a_cloud_base_image_is(tmp_path: Path) -> None:
    """No working venv, no `python` command, no torch on the system python3, no cloud CLI: the
    bootstrap may not rely on any of them. The PyTorch environment is separate."""
    checks = (
        "python3 -m venv /tmp/v >/dev/null 2>&1 && echo HAS-VENV; command -v python && echo HAS-PYTHON; "
        "python3 -c 'import torch' 2>/dev/null && echo HAS-TORCH; "
        "for c in aws gcloud gsutil az; do command -v $c && echo HAS-CLI; done; "
        "/opt/pytorch/bin/python -c 'import torch, sys; print(\"TORCH\", sys.version_info[:2] >= (3, 10))'"
    )
    code, out = run_in_vm(tmp_path, checks, {})
    assert "HAS-" not in out, out
    assert "TORCH True" in out, out


DRIVER = """
import json, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, "/src")
from spotrun.agent.workload import LIB_ENV, process_runtime_env
base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", LIB_ENV: "/src"}
env = process_runtime_env(base, Path("/tmp/shims"))  # what the Agent gives a workload without image:
configs = json.loads(os.environ["CONFIGS"])
ran = set()
for name, setup, run in configs:
    for command in ([setup] if setup else []) + [run + " --help"]:
        if command in ran:  # the same command line in the same runtime: once is enough
            continue
        ran.add(command)
        done = subprocess.run(["bash", "-c", command], cwd="/src/examples", env=env, capture_output=True, text=True)
        print(name, repr(command), "->", done.returncode, done.stderr[-800:], flush=True)
        if done.returncode != 0:
            sys.exit(1)
print("CONFIGS-OK", len(configs))
"""


def test_every_config_runs_as_written_in_the_images_default_runtime(tmp_path: Path) -> None:
    """Each configs/*.yaml's `setup` and `run` (the exact command line, `--help` appended so the CPU
    VM stops after train.py imported torch and spotrun.checkpoint and parsed its arguments) in the
    runtime the Agent gives a workload without `image:` on the emulated image: `python` is the
    image's PyTorch environment, spotrun.checkpoint comes from the Agent's tree."""
    import json

    from spotrun.spec import load_spec

    configs = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        spec = load_spec(path)
        assert Path(spec.workdir or "").resolve() == (ROOT / "examples").resolve(), path
        configs.append((path.name, spec.setup, spec.run.strip()))
    code, out = run_in_vm(tmp_path, 'python3 -c "$DRIVER"', {"DRIVER": DRIVER, "CONFIGS": json.dumps(configs)})
    assert code == 0, out
    assert f"CONFIGS-OK {len(configs)}" in out, out


def test_an_image_without_pip_or_venv_fails_the_boot_with_a_reason(tmp_path: Path) -> None:
    """The bootstrap takes `python3 -m pip`, else pip from a venv; with neither it says what to do."""
    probe = (
        "from spotrun.clouds import vmboot\n"
        "print('PIP', vmboot.pip_command('/tmp/h'))\n"
        "import shutil; shutil.rmtree('/usr/lib/python3/dist-packages/pip')\n"
        "try:\n    vmboot.pip_command('/tmp/h')\nexcept vmboot.BootError as e:\n    print('REFUSED', e)\n"
    )
    code, out = run_in_vm(tmp_path, 'cd /src && PYTHONPATH=/src python3 -c "$PROBE"', {"PROBE": probe})
    assert code == 0, out
    assert "PIP ['/usr/bin/python3', '-m', 'pip']" in out, out
    assert "REFUSED this image's python3 has neither pip nor venv" in out, out
