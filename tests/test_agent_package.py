"""The Agent a cloud VM installs: this spotrun packed into the job's store, fetched by the VM's
bootstrap (spotrun/clouds/vmboot.py, standard library only) over the store's REST API with the VM's
own identity, installable by pip."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from spotrun import __version__
from spotrun.agent import package as agent_package
from spotrun.clouds import vmboot
from spotrun.clouds.base import Boot, extract_boot, render_bootstrap_script
from tests.fakes.storage_emulators import (  # noqa: F401  (fixtures)
    Azurite,
    azurite_fixture,
    azurite_server_fixture,
    make_azure_container,
    unique,
)


def test_the_package_is_deterministic_and_carries_its_metadata() -> None:
    first, second = agent_package.build(), agent_package.build()
    assert first.sha256 == second.sha256
    with tarfile.open(first.path) as tar:
        names = tar.getnames()
        pyproject = tar.extractfile("pyproject.toml").read().decode()  # type: ignore[union-attr]
    assert "spotrun/agent/main.py" in names and "spotrun/catalog/data/offers.csv.gz" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert f'version = "{__version__}"' in pyproject
    assert '"pydantic>=2.6"' in pyproject and 'aws = ["boto3>=1.34"]' in pyproject
    assert "torch" not in pyproject and "pytest" not in pyproject  # never the train or dev extras
    assert agent_package.package_key(first.sha256) == f"agent/spotrun-{__version__}-{first.sha256[:16]}.tar.gz"


def test_pip_installs_it_and_the_agent_imports_from_the_install(tmp_path: Path) -> None:
    packed = agent_package.build()
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*pip, str(target), f"{packed.path}[aws]"], check=True, capture_output=True, timeout=120)
    probe = "import spotrun, spotrun.agent.main, spotrun.catalog; print(spotrun.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip() == str(target / "spotrun" / "__init__.py")


def test_the_package_declares_python_39_and_each_clouds_vm_requirements() -> None:
    with tarfile.open(agent_package.build().path) as tar:
        pyproject = tar.extractfile("pyproject.toml").read().decode()  # type: ignore[union-attr]
        vm = json.loads(tar.extractfile("vm-requirements.json").read())  # type: ignore[union-attr]
    assert 'requires-python = ">=3.9"' in pyproject
    agent = {k: v for k, v in vm.items() if not k.startswith("controller-")}
    assert agent == {
        "aws": ["boto3>=1.34"],
        "gcp": ["google-cloud-storage>=2.16"],
        "azure": ["azure-identity>=1.16", "azure-storage-blob>=12.20"],
    }  # the store SDKs only: an Agent's VM never installs the compute SDKs, the CLI's deps or torch
    # a controller host (`controller: cloud`, its own boot role) installs the control plane + its cloud's SDKs
    control = ["pathspec>=0.12", "platformdirs>=4", "pydantic>=2.6", "pyyaml>=6", "rich>=13", "typer>=0.12"]
    assert vm["controller-aws"] == sorted(["boto3>=1.34", *control])
    assert "google-cloud-compute>=1.20" in vm["controller-gcp"] and "azure-mgmt-compute>=33" in vm["controller-azure"]
    assert not any("torch" in r for reqs in vm.values() for r in reqs)


def test_the_bootstrap_carries_no_credential_and_fits_aws_user_data(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-key-value",
        "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=k",
    }.items():
        monkeypatch.setenv(name, value)
    boot = Boot("j", 1, "s3://b/p", "jobs/j", spotrun_package="s3://b/p/agent/x.tar.gz", spotrun_sha256="ab" * 32)
    script = render_bootstrap_script(boot)
    assert len(script.encode()) < 16384  # EC2's user-data limit
    assert "s3cr3t" not in script and "AccountKey" not in script
    assert "aws s3" not in script and "gcloud" not in script and "az login" not in script  # no cloud CLI needed
    assert extract_boot(script) == boot


def test_sigv4_matches_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM's own S3 signer (stdlib only) signs exactly as botocore does, at the same instant."""
    import datetime

    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    creds = {
        "AccessKeyId": "AKIDEXAMPLE",
        "SecretAccessKey": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        "Token": "tok",
    }
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when)
    for method, body in (("GET", b""), ("PUT", b"boot log\n")):
        url = "https://bkt.s3.eu-west-1.amazonaws.com/runs/jobs/j-1/attempts/2/boot.log"
        ours = vmboot.sigv4_headers(method, url, "eu-west-1", creds, body, now=when)
        request = AWSRequest(
            method=method, url=url, data=body, headers={"x-amz-content-sha256": ours["x-amz-content-sha256"]}
        )
        botocore.auth.S3SigV4Auth(
            Credentials("AKIDEXAMPLE", creds["SecretAccessKey"], "tok"), "s3", "eu-west-1"
        ).add_auth(request)
        assert ours["Authorization"] == request.headers["Authorization"]


def test_the_vm_reads_and_writes_azure_blob_signed_with_shared_key(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Azurite checks SharedKey signatures: a wrong one is refused (403), ours is accepted."""
    container = unique("vmboot")
    make_azure_container(azurite, container)
    store, prefix = vmboot.open_store(f"az://{container}/runs", {})
    assert store.request("PUT", "runs/jobs/j/attempts/1/boot.log", b"hello from the VM\n")[0] == 201
    status, data = store.request("GET", "runs/jobs/j/attempts/1/boot.log")
    assert (status, data, prefix) == (200, b"hello from the VM\n", "runs")
    store.key = base64.b64encode(b"not the account key").decode()
    assert store.request("GET", "runs/jobs/j/attempts/1/boot.log")[0] == 403
