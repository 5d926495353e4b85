"""`controller: cloud` on AWS (issue 16, item 1): the controller host is an EC2 instance (moto) that
boots through the clouds' ordinary boot path in the emulated VM image: its user-data's bootstrap
(clouds/vmboot.py, boot role "controller") finds the image's Python >= 3.11 (/opt/pytorch/bin/python),
pip-installs spotrun's control plane from the image's package index, and runs
`python -m spotrun.control.durable.serve`. That host adopts the queued job, launches the job's
instance (another emulated VM, running the Agent), sees it complete, and deletes itself once idle.

Machine A only launches (`launch --detach` exits at once); machine B knows only the store URL.
Nothing of the job runs on A or B: the host's controller holds the job's lease throughout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spotrun.clouds.store import open_store
from spotrun.control.durable.host import HOST_JOB, host_info
from spotrun.control.durable.lease import read_lease
from tests.fakes import vm_image
from tests.fakes.aws_emulator import AWSEmulator
from tests.fakes.cloud_e2e import ROOT, Reference, output_digest, write_tiny_workdir
from tests.fakes.moto_server import MotoServer, aws, fast_session, moto_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.e2e

REGION = "us-east-1"
ARGS = ["30", "10", "0"]  # steps, checkpoint every, seconds per step

SPEC = """
name: cloud-host
resources:
  gpu: "T4:1"
  providers: [aws]
  regions: [{region}]
workdir: {workdir}
run: {run}
checkpoint: {{keep: 3}}
recovery: {{max_restarts: 0, zone_cooldown: 1h}}
"""


def _wait(cond: Callable[[], Any], timeout: float, what: str, report: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{report()}")


def _instances(**filters: list[str]) -> list[dict[str, Any]]:
    ec2 = fast_session(REGION).client("ec2")
    pages = ec2.describe_instances(Filters=[{"Name": k, "Values": v} for k, v in filters.items()])
    return [i for r in pages["Reservations"] for i in r["Instances"]]


def _tag(raw: dict[str, Any], key: str) -> str:
    return next((t["Value"] for t in raw.get("Tags", []) if t["Key"] == key), "")


@pytest.mark.skipif(vm_image.unavailable() is not None, reason=str(vm_image.unavailable()))
def test_controller_host_boots_on_an_ec2_vm_drives_the_job_and_deletes_itself(
    tmp_path: Path,
    aws: MotoServer,  # noqa: F811
) -> None:
    bucket = "spotrun-cloud-host"
    fast_session(REGION).client("s3").create_bucket(Bucket=bucket)
    store_url = f"s3://{bucket}/spotrun"
    workdir = write_tiny_workdir(tmp_path / "work")
    reference = Reference(workdir, [*ARGS[:2], "0"])
    spec = tmp_path / "job.yaml"
    spec.write_text(
        SPEC.format(region=REGION, workdir=workdir, run=json.dumps("python tiny_train.py " + " ".join(ARGS)))
    )
    config = tmp_path / "config.yaml"
    config.write_text("controller: cloud\n")

    def cli(machine: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SPOTRUN_HOME=str(tmp_path / machine), SPOTRUN_CONTROLLER_IDLE="4")
        if machine == "a":
            env["SPOTRUN_CONFIG"] = str(config)
        return subprocess.run(
            [sys.executable, "-m", "spotrun", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )

    planned = cli("a", "plan", str(spec), "--json")
    assert planned.returncode == 0, planned.stderr[-3000:]
    estimate = json.loads(planned.stdout)["controller_host"]
    assert (estimate["provider"], estimate["instance_type"], estimate["hourly_usd"]) == ("aws", "t3.small", 0.0208)
    assert estimate["monthly_usd_if_always_on"] == 15.18

    with AWSEmulator(tmp_path / "instances", regions=[REGION], env=aws.env()) as emu:
        launched = cli("a", "launch", str(spec), "--detach", "--store", store_url, "--yes", "--json")
        assert launched.returncode == 0, launched.stderr[-3000:]
        job = json.loads(launched.stdout)["job_id"]  # A's process has exited

        (host,) = _instances(**{"tag:spotrun:job": [HOST_JOB]})
        assert (host["InstanceType"], host.get("InstanceLifecycle")) == ("t3.small", None)  # on-demand, no GPU
        store = open_store(store_url)
        info = host_info(store)
        assert info is not None and (info["provider"], info["instance_type"], info["hourly_price"]) == (
            "aws",
            "t3.small",
            0.0208,
        )

        # the host's own controller takes the job's lease (B must not be the one to adopt it)
        lease = _wait(
            lambda: (read_lease(store, job) or {}).get("holder") and read_lease(store, job),
            150,
            "the host's controller to drive the job",
            emu.report,
        )
        assert lease["host"] != socket.gethostname()  # a process on the VM (its own hostname), not here
        console = emu.instance(host["InstanceId"]).vm.read_console()  # type: ignore[union-attr]
        assert "found /opt/pytorch/bin/python (python 3.11)" in console, console[-3000:]
        assert "-m spotrun.control.durable.serve --store " + store_url in console

        waited = cli("b", "wait", job, "--store", store_url, "--json")
        assert waited.returncode == 0, waited.stderr[-3000:] + emu.report()
        assert json.loads(waited.stdout)["status"] == "SUCCEEDED"
        assert "started one here" not in waited.stderr  # the host drove it; B only read the store
        assert not (tmp_path / "b" / f"controller-{job}.log").exists()
        assert not (tmp_path / "a" / f"controller-{job}.log").exists()
        status = cli("b", "status", job, "--store", store_url, "--json")
        row = json.loads(status.stdout)
        assert (row["status"], row["attempts"], row["exit_code"]) == ("SUCCEEDED", 1, 0), row
        assert row["controller_host"]["instance_type"] == "t3.small"
        assert output_digest(store, job) == reference.digest()

        # idle for SPOTRUN_CONTROLLER_IDLE seconds: the host releases its lease and terminates itself
        _wait(
            lambda: not _instances(**{"instance-state-name": ["pending", "running"]}), 90, "the host to go", emu.report
        )
        console = emu.instance(host["InstanceId"]).vm.read_console()  # type: ignore[union-attr]
        assert "controller host stops: idle" in console, console[-3000:]
        assert (host_info(store) or {}).get("holder") is None
        assert store.list("controller/jobs/") == []
