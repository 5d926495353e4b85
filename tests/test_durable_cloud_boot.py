"""`controller: cloud` on GCP and Azure goes through the same boot path as on AWS (whose end-to-end
run is tests/e2e/test_durable_cloud_host.py): the host's launch request, sent to the cloud's fake,
carries a boot record with the controller role, the cloud's extra, the verified package and the
host lease's holder; the VM program refuses an image without Python >= 3.11, and the package
knows its own requirements when it runs uninstalled (as on a controller host)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from spotrun.agent import package as agent_package
from spotrun.clouds import vmboot
from spotrun.clouds.base import Boot, extract_boot
from spotrun.clouds.store import open_store
from spotrun.control.durable.host import HOST_JOB, ensure_host, host_info, host_offers
from tests.fakes.azure_server import FakeARM, arm_fixture, arm_server_fixture  # noqa: F401  (fixtures)
from tests.fakes.gce_server import FakeGCE, gce_fixture, gce_server_fixture  # noqa: F401  (fixtures)
from tests.test_azure_provider import make_provider as azure_provider
from tests.test_gcp_provider import make_provider as gcp_provider


def check_controller_boot(sent: Boot, store_url: str, cloud: str) -> None:
    store = open_store(store_url)
    assert (sent.role, sent.extra, sent.job_id) == ("controller", cloud, HOST_JOB)
    info = host_info(store)
    assert info is not None and sent.env["SPOTRUN_CONTROLLER_HOLDER"] == info["holder"]  # the lease it reserved
    assert sent.env["SPOTRUN_CONTROLLER_IDLE"] == "7"
    key = sent.spotrun_package[len(store_url) + 1 :]
    assert hashlib.sha256(store.get_bytes(key)).hexdigest() == sent.spotrun_sha256  # what the VM will verify
    assert not any("SECRET" in k or "KEY" in k for k in sent.env)


def test_gcp_controller_host_launch_carries_the_controller_role(tmp_path: Path, gce: FakeGCE) -> None:
    store_url = (tmp_path / "store").as_uri()
    provider = gcp_provider(gce)
    gce.machine_types.add("e2-small")  # a real type in every GCE zone; the fake knows the catalog's (GPU) types
    info = ensure_host(open_store(store_url), provider, idle=7, offers=host_offers("gcp", []))
    assert (info["provider"], info["instance_type"]) == ("gcp", "e2-small")
    (req,) = gce.requests_to("POST", r"/instances$")
    body = req.body
    assert body["machineType"].endswith("/machineTypes/e2-small") and not body.get("guestAccelerators")
    assert body["scheduling"]["provisioningModel"] == "STANDARD"  # on-demand: a host must not be preempted
    items = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    check_controller_boot(extract_boot(items["startup-script"]), store_url, "gcp")


def test_azure_controller_host_launch_carries_the_controller_role(tmp_path: Path, arm: FakeARM) -> None:
    store_url = (tmp_path / "store").as_uri()
    provider = azure_provider(arm)
    arm.sizes.add("Standard_B1ms")  # a real size in eastus; the fake knows the catalog's (GPU) sizes
    info = ensure_host(open_store(store_url), provider, idle=7, offers=host_offers("azure", []))
    assert (info["provider"], info["instance_type"]) == ("azure", "Standard_B1ms")
    (req,) = arm.requests_to("PUT", r"/virtualMachines/")
    props = req.body["properties"]
    assert props["hardwareProfile"]["vmSize"] == "Standard_B1ms" and props["priority"] == "Regular"  # on-demand
    sent = extract_boot(base64.b64decode(props["osProfile"]["customData"]).decode())
    check_controller_boot(sent, store_url, "azure")


def fake_python(path: Path, version: str) -> str:
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return str(path)


def test_an_image_without_python_311_fails_the_boot_saying_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmboot, "LOG_PATH", str(tmp_path / "boot.log"))
    monkeypatch.setattr(vmboot.sys, "executable", fake_python(tmp_path / "python3", "3 9"))
    monkeypatch.setattr(vmboot, "CONTROLLER_PYTHONS", (fake_python(tmp_path / "py310", "3 10"), "/nonexistent/py"))
    with pytest.raises(vmboot.BootError, match="needs python >= 3.11"):
        vmboot.controller_python()
    assert "python 3.10" in (tmp_path / "boot.log").read_text()  # what it looked at is in the boot log
    good = fake_python(tmp_path / "py312", "3 12")
    monkeypatch.setattr(vmboot, "CONTROLLER_PYTHONS", (good,))
    assert vmboot.controller_python() == (good, (3, 12))


def test_the_package_knows_its_requirements_when_run_uninstalled(tmp_path: Path) -> None:
    """A controller host imports the unpacked package from PYTHONPATH (no dist-info): its own
    job controllers build the Agent package from there, with the same requirements."""
    with tarfile.open(agent_package.build().path) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    probe = "import json; from spotrun.agent import package; print(json.dumps(package.vm_requirements()))"
    env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": os.environ.get("PATH", "")}
    done = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == agent_package.vm_requirements()
