"""The controller's state machine, against a scripted provider (a cloud whose every answer the
test decides) and a real LocalStore + SQLite state. Whole launches on real providers are in
tests/e2e/; here each rule of the loop is pinned down quickly and deterministically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spotrun.catalog.model import Offer
from spotrun.clock import FakeClock
from spotrun.clouds.base import (
    AuthError,
    Boot,
    Instance,
    InstanceState,
    InstanceStatus,
    NoCapacity,
    Provider,
    QuotaExceeded,
    Throttled,
)
from spotrun.clouds.store import LocalStore
from spotrun.control.controller import Controller, ControllerOptions
from spotrun.control.state import JobStatus, State
from spotrun.spec import load_spec


def offer(zone: str, spot: float, od: float = 4.0, rate: float = 0.01) -> Offer:
    return Offer(
        provider="scripted",
        region="r1",
        zone=zone,
        instance_type="gpu1",
        gpu="A100",
        gpu_count=1,
        gpu_memory_gb=40,
        vcpus=8,
        memory_gb=64,
        spot_price=spot,
        ondemand_price=od,
        interruption_rate=rate,
    )


@dataclass
class FakeInstance:
    instance: Instance
    alive: bool = True
    status: InstanceStatus = InstanceStatus.RUNNING


@dataclass
class ScriptedProvider(Provider):
    """zone → list of outcomes, one per launch in that zone: "nocap", "quota", "auth", "boom"
    (raise after the instance was created), or ("exit", code) / "preempt" / "run" (keep running)."""

    store: LocalStore
    script: dict[str, list]
    clock: FakeClock
    name: str = "scripted"
    launched: list[FakeInstance] = field(default_factory=list)
    tokens: dict[str, FakeInstance] = field(default_factory=dict)
    calls: int = 0
    fate: dict[str, object] = field(default_factory=dict)
    refuse_terminations: int = 0

    def launch(self, offer: Offer, *, spot: bool, boot: Boot, client_token: str) -> Instance:
        self.calls += 1
        if client_token in self.tokens:
            return self.tokens[client_token].instance
        outcome = self.script[offer.zone].pop(0)
        if outcome == "nocap":
            raise NoCapacity("no capacity", code="InsufficientInstanceCapacity")
        if outcome == "quota":
            raise QuotaExceeded("quota", code="VcpuLimitExceeded")
        if outcome == "quota-everywhere":
            raise QuotaExceeded("GPUS_ALL_REGIONS", code="QUOTA_EXCEEDED", scope="provider")
        if outcome == "auth":
            raise AuthError("expired token", code="ExpiredToken")
        inst = Instance("scripted", f"i-{len(self.launched) + 1}", "r1", offer.zone, "gpu1", spot, boot.job_id,
                        boot.attempt, 0.0)  # fmt: skip
        fake = FakeInstance(inst)
        self.launched.append(fake)
        self.tokens[client_token] = fake
        if outcome == "boom":
            raise RuntimeError("connection reset after the instance was created")
        self.fate[inst.instance_id] = (outcome, boot)
        return inst

    def poll(self, instance: Instance) -> InstanceState:
        fake = self._find(instance.instance_id)
        outcome, boot = self.fate[instance.instance_id]
        if not fake.alive:
            return InstanceState(InstanceStatus.TERMINATED)
        if outcome == "preempt":
            return InstanceState(InstanceStatus.PREEMPTED, reason="spot interruption")
        if isinstance(outcome, tuple) and outcome[0] == "exit":
            code = outcome[1]
            reason = outcome[2] if len(outcome) > 2 else "completed" if code == 0 else "failed"
            self.store.put_bytes(
                f"jobs/{boot.job_id}/attempts/{boot.attempt}/exit",
                json.dumps({"code": code, "reason": reason}).encode(),
            )
            return InstanceState(InstanceStatus.EXITED, exit_code=code)
        if outcome == "run":  # a live Agent heartbeats; "hang" does not
            beat = json.dumps({"at": self.clock.now(), "phase": "running"}).encode()
            self.store.put_bytes(f"jobs/{boot.job_id}/attempts/{boot.attempt}/heartbeat", beat)
        return InstanceState(InstanceStatus.RUNNING)

    def terminate(self, instance: Instance) -> None:
        if self.refuse_terminations > 0:
            self.refuse_terminations -= 1
            raise Throttled("RequestLimitExceeded", code="RequestLimitExceeded")
        self._find(instance.instance_id).alive = False

    def list_owned(self, job_id: str) -> list[Instance]:
        return [f.instance for f in self.launched if f.alive and f.instance.job_id == job_id]

    def _find(self, instance_id: str) -> FakeInstance:
        return next(f for f in self.launched if f.instance.instance_id == instance_id)


SPEC = """
name: ctl
resources: {{gpu: "A100:1"}}
run: python train.py
recovery: {{max_restarts: {restarts}, zone_cooldown: 1h}}
{extra}
"""


@pytest.fixture
def env(tmp_path: Path):
    state = State(tmp_path / "state.db")
    store = LocalStore(tmp_path / "store")
    clock = FakeClock()
    return state, store, clock


def make(env, script, offers, restarts: int = 1, extra: str = "", tmp: Path | None = None):
    state, store, clock = env
    spec_file = Path(store.root).parent / "job.yaml"
    spec_file.write_text(SPEC.format(restarts=restarts, extra=extra))
    spec = load_spec(spec_file)
    provider = ScriptedProvider(store, script, clock)
    controller = Controller(
        state,
        providers={"scripted": provider},
        offers=offers,
        store_url=store.url,
        clock=clock,
        options=ControllerOptions(poll_interval=1.0, capacity_wait=30.0, launch_retry_backoff=5.0),
    )
    return controller, provider, controller.submit(spec)


def reasons(state: State, job_id: str) -> list[tuple[str, str | None]]:
    return [(a.zone, a.end_reason) for a in state.attempts(job_id)]


def test_fails_over_past_a_zone_without_capacity(env):
    controller, provider, job = make(env, {"a": ["nocap"], "b": [("exit", 0)]}, [offer("a", 1.0), offer("b", 1.5)])
    result = controller.run(job)
    assert (result.status, result.exit_code) == (JobStatus.SUCCEEDED, 0)
    assert reasons(env[0], job) == [("a", "launch_failed"), ("b", "completed")]
    assert provider.list_owned(job) == []


def test_quota_error_also_fails_over(env):
    controller, _, job = make(env, {"a": ["quota"], "b": [("exit", 0)]}, [offer("a", 1.0), offer("b", 1.5)])
    assert controller.run(job).exit_code == 0


def test_a_provider_wide_quota_skips_that_provider_for_the_round(env):
    controller, _, job = make(env, {"a": ["quota-everywhere"], "b": [("exit", 0)]}, [offer("a", 1.0), offer("b", 1.5)])
    assert controller.run(job).exit_code == 0
    first, second = env[0].attempts(job)
    assert (first.zone, second.zone) == ("a", "b")
    assert second.created_at - first.created_at >= 5.0  # b was not tried in the round the quota blocked


def test_preemption_relaunches_in_another_zone(env):
    controller, provider, job = make(env, {"a": ["preempt"], "b": [("exit", 0)]}, [offer("a", 1.0), offer("b", 1.5)])
    result = controller.run(job)
    assert result.exit_code == 0 and result.preemptions == 1
    assert reasons(env[0], job) == [("a", "preempted"), ("b", "completed")]
    assert not any(f.alive for f in provider.launched)


def test_user_failure_is_retried_then_fails_with_exit_1(env):
    controller, _, job = make(env, {"a": [("exit", 3), ("exit", 3)]}, [offer("a", 1.0)], restarts=1)
    result = controller.run(job)
    assert (result.status, result.exit_code, result.job_exit_code) == (JobStatus.FAILED, 1, 3)
    assert reasons(env[0], job) == [("a", "failed"), ("a", "failed")]
    assert "max_restarts 1" in result.reason


def test_expired_credentials_stop_with_exit_2(env):
    controller, _, job = make(env, {"a": ["auth"]}, [offer("a", 1.0)])
    result = controller.run(job)
    assert (result.status, result.exit_code) == (JobStatus.FAILED, 2)
    assert "credentials rejected" in result.reason


def test_an_instance_left_by_a_failed_launch_is_terminated(env):
    controller, provider, job = make(env, {"a": ["boom"], "b": [("exit", 0)]}, [offer("a", 1.0), offer("b", 1.5)])
    assert controller.run(job).exit_code == 0
    assert [f.alive for f in provider.launched] == [False, False]
    assert any(e.kind == "sweep" for e in env[0].events(job))


def test_a_launch_interrupted_by_a_crash_is_reissued_with_the_same_token(env):
    state, _, clock = env
    controller, provider, job = make(env, {"a": [("exit", 0)]}, [offer("a", 1.0)])
    # The previous controller wrote the attempt, launched, and died before recording the instance.
    attempt = state.begin_attempt(job, provider="scripted", region="r1", zone="a", instance_type="gpu1", spot=True,
                                  offer_key=offer("a", 1.0).key, hourly_price=1.0, ondemand_price=4.0, time_scale=1.0,
                                  now=clock.now())  # fmt: skip
    boot = Boot(job, attempt.n, env[1].url, f"jobs/{job}")
    provider.launch(offer("a", 1.0), spot=True, boot=boot, client_token=attempt.client_token)
    assert controller.run(job).exit_code == 0
    assert len(provider.launched) == 1  # the re-issued launch returned the same instance


def test_budget_exhausted_stops_with_exit_4(env):
    controller, provider, job = make(
        env, {"a": ["run"]}, [offer("a", 100.0, od=400.0)], extra="budget: 1\nworkload: {hours: 0.005}"
    )
    result = controller.run(job)
    assert (result.status, result.exit_code) == (JobStatus.BUDGET_EXHAUSTED, 4)
    # stopped at the projected spend of the next poll + the last checkpoint's grace: never over by a poll
    assert result.spent <= 1.0
    assert any(e.kind == "limit" and "last checkpoint" in e.message for e in env[0].events(job))
    assert provider.list_owned(job) == []


def test_an_instance_without_heartbeats_is_replaced(env):
    controller, provider, job = make(env, {"a": ["hang"], "b": [("exit", 0)]}, [offer("a", 1.0), offer("b", 1.5)])
    assert controller.run(job).exit_code == 0
    assert reasons(env[0], job) == [("a", "lost"), ("b", "completed")]
    assert env[0].attempts(job)[0].detail == "no heartbeat"
    assert not any(f.alive for f in provider.launched)


def test_cancel_terminates_everything_with_exit_130(env):
    state, _, clock = env
    controller, provider, job = make(env, {"a": ["run"]}, [offer("a", 1.0)])
    seen = []

    def on_update(snap):
        seen.append(snap)
        if len(seen) == 3:
            state.request_cancel(job, clock.now())

    controller.on_update = on_update
    result = controller.run(job)
    assert (result.status, result.exit_code) == (JobStatus.CANCELLED, 130)
    assert provider.list_owned(job) == []
    assert reasons(state, job) == [("a", "cancelled")]


def test_no_capacity_anywhere_gives_exit_3(env):
    controller, _, job = make(env, {"a": ["nocap"] * 50}, [offer("a", 1.0)])
    result = controller.run(job)
    assert (result.status, result.exit_code) == (JobStatus.NO_CAPACITY, 3)


def test_nothing_fits_gives_exit_3_without_launching(env):
    from dataclasses import replace

    controller, provider, job = make(env, {}, [replace(offer("a", 1.0), gpu="T4", gpu_memory_gb=16)])
    result = controller.run(job)
    assert (result.status, result.exit_code) == (JobStatus.NO_CAPACITY, 3)
    assert provider.calls == 0


def test_an_agent_error_after_a_zero_exit_is_not_a_success(env):
    # The workload exited 0 but its outputs could not be uploaded: retried, never called done.
    controller, _, job = make(env, {"a": [("exit", 0, "agent-error"), ("exit", 0)]}, [offer("a", 1.0)])
    result = controller.run(job)
    assert result.exit_code == 0
    # an Agent error is not the workload failing: its own end reason, not counted in max_restarts
    assert [a.end_reason for a in env[0].attempts(job)] == ["agent_error", "completed"]


def test_a_refused_termination_is_retried_before_the_attempt_ends(env):
    controller, provider, job = make(env, {"a": ["preempt"], "b": [("exit", 0)]}, [offer("a", 1.0), offer("b", 1.5)])
    provider.refuse_terminations = 2
    assert controller.run(job).exit_code == 0
    assert not any(f.alive for f in provider.launched)
    assert sum(e.kind == "terminate_error" for e in env[0].events(job)) == 2


def test_a_job_can_be_rebuilt_from_state_without_its_secrets(monkeypatch, tmp_path):
    from spotrun.control.controller import planning_spec, stored_spec
    from spotrun.spec import parse_spec_text

    monkeypatch.setenv("MY_TOKEN", "s3cret")
    spec = parse_spec_text("name: x\nrun: t\nenv:\n  TOKEN: ${MY_TOKEN}\n", "job.yaml", base_dir=tmp_path)
    saved = stored_spec(spec)
    assert "s3cret" not in str(saved)
    monkeypatch.delenv("MY_TOKEN")
    rebuilt = planning_spec(saved)  # a cancel from a shell without the secret still works
    assert rebuilt.env["TOKEN"] == "" and "TOKEN" in rebuilt.secret_env_keys


def test_a_cloud_instance_is_told_where_the_agent_package_is(env):
    from dataclasses import replace

    state, store, clock = env
    aws_offer = replace(offer("us-east-1a", 1.0), provider="aws")
    controller, provider, job = make(env, {"us-east-1a": [("exit", 0)]}, [aws_offer])
    controller.providers = {"aws": provider}
    assert controller.run(job).exit_code == 0
    _, boot = provider.fate["i-1"]
    assert boot.extra == "aws" and boot.spotrun_spec.startswith("spotrun[aws]==")
    key = boot.spotrun_package.removeprefix(store.url + "/")
    assert key.startswith("agent/spotrun-") and store.exists(key)  # uploaded to the job's store
