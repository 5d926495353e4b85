"""`spotrun gc` deletes the AWS controller-host role of a store whose host is gone (issue 16): the
role (`spotrun-controller-<hash>`, one per store, clouds/aws/resources.py) outlives its host so
the next host reuses it, and costs nothing, but nothing else would ever delete it. A store whose
host still holds its lease, or has jobs queued for one, or whose host ran elsewhere than on AWS,
keeps its role (and gc makes no AWS call for it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spotrun.cli.app import app
from spotrun.clouds.aws.provider import AWSProvider
from spotrun.clouds.aws.resources import controller_profile_name
from spotrun.clouds.base import Boot
from spotrun.clouds.store import open_store
from spotrun.control.durable.host import HOST_KEY, enqueue
from spotrun.control.state import JobStatus, State
from tests.fakes.moto_server import MotoServer, aws, fast_session, moto_server  # noqa: F401  (fixtures)
from tests.test_aws_provider import offer

REGION = "us-east-1"


def _host_lease(store_url: str, *, alive: bool, provider: str = "aws") -> None:
    expires = time.time() + (600 if alive else 0)
    # as ensure_host writes it: the host's offer with the lease
    body = {"provider": provider, "holder": "h1" if alive else None, "host": "vm-1", "pid": 7, "expires_at": expires}
    open_store(store_url).put_bytes(HOST_KEY, json.dumps(body).encode())


def _roles() -> list[str]:
    iam = fast_session(REGION).client("iam")
    return sorted(p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"])


@pytest.mark.parametrize("host", ["gone", "alive", "queued", "local"])
def test_gc_deletes_the_controller_role_of_a_store_whose_host_is_gone(
    host: str,
    aws: MotoServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPOTRUN_HOME", str(tmp_path / "home"))
    session = fast_session(REGION)
    session.client("s3").create_bucket(Bucket="team")
    store_url = "s3://team/runs"
    provider = AWSProvider(region=REGION, session=session, regions=[REGION])
    boot = Boot(job_id="spotrun-controller", attempt=1, store_url=store_url, job_prefix="jobs/x", role="controller")
    provider.launch(offer(), spot=False, boot=boot, client_token="host-1")
    assert _roles() == [controller_profile_name(store_url)]
    _host_lease(store_url, alive=host == "alive", provider="local" if host == "local" else "aws")
    if host == "queued":
        enqueue(open_store(store_url), "waiting-1")
    state = State.open_default()
    spec = {"name": "j", "run": "python t.py", "resources": {"gpu": "T4:1", "providers": ["aws"], "regions": [REGION]}}
    state.create_job("done-1", "j", spec, store_url, time.time(), None)
    state.set_job_status("done-1", JobStatus.SUCCEEDED, time.time(), exit_code=0)

    out = CliRunner().invoke(app, ["gc", "--older-than", "1h", "--json"])  # removes no job: only the role
    assert out.exit_code == 0, out.output
    released = json.loads(out.stdout)["controller_roles_released"]
    if host == "gone":
        assert released == [store_url] and _roles() == []
    else:
        assert released == [] and _roles() == [controller_profile_name(store_url)]
