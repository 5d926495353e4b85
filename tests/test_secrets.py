"""The controller's and the Agent's side of `${VAR}` secrets, cloud-independent parts: which
variables a shell lacks, a resume refused (exit 2) without them unless every cloud holds the job's
secret, cancel without them, the launch hook refusing to launch without a value, the Agent reading
the values by reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from spotrun.agent.secrets import fetch_secrets
from spotrun.cli.app import app
from spotrun.clouds.secrets import SECRETS_REF_ENV, SecretsError, decode_ref, encode_ref
from spotrun.control.controller import Controller
from spotrun.control.secrets import boot_env, missing_variables, resume_refusal
from spotrun.control.state import JobStatus, State
from spotrun.spec import load_spec
from tests.fakes.gce_server import gce_fixture, gce_server_fixture  # noqa: F401  (fixtures)
from tests.fakes.gcp_secret_fake import secret_manager  # noqa: F401  (fixture)
from tests.fakes.moto_server import MotoServer, aws, fast_session, moto_server  # noqa: F401  (fixtures)

VAR = "SPOTRUN_TEST_SECRET_VAR"
SPEC = """
name: secret-job
resources: {{providers: [{providers}]}}
run: echo hi
env: {{TOKEN: "${{{var}}}", WITH_DEFAULT: "${{SPOTRUN_TEST_UNSET:-x}}", PLAIN: p}}
"""


def submit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, providers: str) -> tuple[State, str]:
    monkeypatch.setenv(VAR, "s3cr3t-value")
    (tmp_path / "job.yaml").write_text(SPEC.format(providers=providers, var=VAR))
    state = State.open_default()
    job = Controller(state, store_url=(tmp_path / "store").as_uri()).submit(load_spec(tmp_path / "job.yaml"))
    monkeypatch.delenv(VAR)  # a new shell, without the secret
    return state, job


def test_missing_variables_names_only_what_has_no_default() -> None:
    stored = {"env": {"A": "${ONE}-${TWO:-d}", "B": "$${LITERAL}", "C": "plain"}}
    assert missing_variables(stored, environ={}) == ["ONE"]
    assert missing_variables(stored, environ={"ONE": ""}) == []  # set, even empty


def test_resume_without_the_secret_exits_2_and_launches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, job = submit(tmp_path, monkeypatch, "local")
    result = CliRunner().invoke(app, ["launch", "--resume", job])
    assert result.exit_code == 2, result.output
    assert VAR in result.output and "s3cr3t" not in result.output
    assert state.attempts(job) == [] and state.job(job).status == JobStatus.PENDING
    # cancel and status still work without it
    assert CliRunner().invoke(app, ["status", job]).exit_code == 0
    cancelled = CliRunner().invoke(app, ["cancel", job, "--wait", "0"])
    assert cancelled.exit_code == 0, cancelled.output
    assert state.job(job).status == JobStatus.CANCELLED


def test_resume_may_go_on_when_the_cloud_holds_the_jobs_secret(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    aws: MotoServer,  # noqa: F811
) -> None:
    from spotrun.clouds.aws.provider import AWSProvider
    from spotrun.clouds.aws.secrets import AWSSecrets

    state, job = submit(tmp_path, monkeypatch, "aws")
    refusal = resume_refusal(state, job)
    assert refusal is not None and VAR in refusal and "aws holds no copy" in refusal
    store = AWSSecrets.from_provider(AWSProvider(region="us-east-1", session=fast_session(), regions=["us-east-1"]))
    store.put(job, {"TOKEN": "s3cr3t-value"})  # what the first launch stored
    assert resume_refusal(state, job) is None

    # the launch hook then hands the VM the stored secret's reference, without writing a new value
    provider = AWSProvider(region="us-east-1", session=fast_session(), regions=["us-east-1"])
    from spotrun.control.specs import planning_spec

    spec = planning_spec(state.job(job).spec)
    env = boot_env("aws", provider, job, spec, state.job(job).spec)
    assert decode_ref(env[SECRETS_REF_ENV]) == store.find(job)
    versions = fast_session().client("secretsmanager").list_secret_version_ids(SecretId=f"spotrun/{job}")["Versions"]
    assert len(versions) == 1
    assert fetch_secrets(env, ["TOKEN"]) == {"TOKEN": "s3cr3t-value"}  # the Agent, by reference
    with pytest.raises(SecretsError, match="lacks NOT_THERE"):
        fetch_secrets(env, ["TOKEN", "NOT_THERE"])

    store.delete(job)  # no copy left, no value here: the launch hook refuses, naming the variable
    with pytest.raises(SecretsError, match=VAR) as refused:
        boot_env("aws", provider, job, spec, state.job(job).spec)
    assert refused.value.permanent


def test_a_local_agent_gets_no_reference() -> None:
    assert fetch_secrets({}, ["TOKEN"]) == {}
    with pytest.raises(SecretsError, match="no secret store"):
        fetch_secrets({SECRETS_REF_ENV: encode_ref({"cloud": "local"})}, ["TOKEN"])


def test_a_cloud_that_cannot_hold_the_secret_ends_the_job_before_any_launch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    gce: Any,
    secret_manager: Any,  # noqa: F811
) -> None:
    """GCP without a service account: no VM could read the secret, so the job fails (exit 2)
    naming what to set, and no instance was ever created."""
    from spotrun.catalog.model import Offer
    from spotrun.clouds.gcp.provider import GCPProvider
    from tests.fakes.gce_server import PROJECT, gce_credentials

    monkeypatch.setenv("SECRET_MANAGER_EMULATOR_HOST", secret_manager.url)
    monkeypatch.setenv(VAR, "s3cr3t-value")
    (tmp_path / "job.yaml").write_text(SPEC.format(providers="gcp", var=VAR))
    offer = Offer("gcp", "us-central1", "us-central1-a", "n1-standard-8", "T4", 1, 16.0, 8, 30, 0.1, 0.75, 0.05)
    provider = GCPProvider(
        PROJECT, endpoint=gce.url, credentials=gce_credentials(), imds_endpoint=gce.metadata_endpoint
    )
    controller = Controller(
        State(tmp_path / "state.db"), providers={"gcp": provider}, offers=[offer], store_url=(tmp_path / "s").as_uri()
    )
    job = controller.submit(load_spec(tmp_path / "job.yaml"))
    result = controller.run(job)
    assert (result.status, result.exit_code) == (JobStatus.FAILED, 2)
    assert "gcp.service_account" in (result.reason or "")
    assert gce.requests_to("POST", r"/instances$") == [] and secret_manager.secrets == {}


def test_cancel_without_the_value_deletes_the_jobs_secret(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    aws: MotoServer,  # noqa: F811
) -> None:
    from spotrun.clouds.aws.provider import AWSProvider
    from spotrun.clouds.aws.secrets import AWSSecrets

    state, job = submit(tmp_path, monkeypatch, "aws")
    store = AWSSecrets.from_provider(AWSProvider(region="us-east-1", session=fast_session(), regions=["us-east-1"]))
    store.put(job, {"TOKEN": "s3cr3t-value"})  # a first launch stored it, then its attempt failed
    attempt = state.begin_attempt(
        job, provider="aws", region="us-east-1", zone="us-east-1a", instance_type="p3.2xlarge", spot=True,
        offer_key="k", hourly_price=1.0, ondemand_price=3.0, time_scale=1.0, now=1.0, store_url=None,
    )  # fmt: skip
    state.end_attempt(job, attempt.n, "launch_failed", 2.0, detail="NoCapacity")
    # what `spotrun cancel` does when no controller runs (the provider told its region: no region sweep)
    state.request_cancel(job, 3.0)
    provider = AWSProvider(region="us-east-1", session=fast_session(), regions=["us-east-1"])
    Controller(state, providers={"aws": provider}).run(job)
    assert state.job(job).status == JobStatus.CANCELLED
    assert store.find(job) is None
    assert any(e.kind == "secrets" and "deleted" in e.message for e in state.events(job))
