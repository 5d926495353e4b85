"""The state machine of a job: plan → launch (fail over) → watch → recover → … → done.

Every transition is written to State *before* the controller acts on it: an attempt row is
created (with its idempotency token) before `provider.launch` is called, so a controller that is
killed at any point and restarted (`spotrun launch --resume JOB`) re-issues the same launch
(which the provider deduplicates) or adopts the instance, and never starts a second one. After
every attempt, and on start, it sweeps `provider.list_owned(job)` and terminates any instance
State does not know as the current one: a failed launch never leaves a stray instance running.

Outcome → exit code (DESIGN.md): 0 succeeded, 1 failed, 2 bad input (incl. credentials),
3 no capacity, 4 budget or deadline, 130 cancelled.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spotrun.clock import SYSTEM_CLOCK, Clock
from spotrun.decide import make_job_policy, observation, order_for
from spotrun.policy import Decision, Policy
from spotrun.providers.base import (
    AuthError,
    BadRequest,
    Boot,
    Instance,
    InstanceState,
    InstanceStatus,
    NoCapacity,
    PriceTooLow,
    Provider,
    ProviderError,
    QuotaExceeded,
    Throttled,
)
from spotrun.state import Attempt, AttemptStatus, Job, JobStatus, State
from spotrun.store import NotFound, Store, StoreError, job_prefix, open_store

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer
    from spotrun.planner import Candidate
    from spotrun.spec import JobSpec

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_CAPACITY = 3
EXIT_BUDGET = 4
EXIT_CANCELLED = 130
EXIT_AGENT_ERROR = 70  # the Agent's own code for "the workload may be fine, but I could not finish"

EXIT_CODES = {
    JobStatus.SUCCEEDED: EXIT_OK,
    JobStatus.FAILED: EXIT_FAILED,
    JobStatus.NO_CAPACITY: EXIT_NO_CAPACITY,
    JobStatus.BUDGET_EXHAUSTED: EXIT_BUDGET,
    JobStatus.DEADLINE_EXCEEDED: EXIT_BUDGET,
    JobStatus.CANCELLED: EXIT_CANCELLED,
}

CLOUDS = ("aws", "gcp", "azure")
FINISH_TERMINATE_TRIES = 5
LEASE_STALE_AFTER = 120.0  # seconds without a check-in before a controller whose pid is not spotrun loses the job


@dataclass
class JobResult:
    job_id: str
    status: JobStatus
    exit_code: int
    job_exit_code: int | None
    reason: str
    attempts: int
    preemptions: int
    spent: float
    ondemand_equivalent: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "exit_code": self.exit_code,
            "job_exit_code": self.job_exit_code,
            "reason": self.reason,
            "attempts": self.attempts,
            "preemptions": self.preemptions,
            "spent_usd": round(self.spent, 6),
            "ondemand_equivalent_usd": None if self.ondemand_equivalent is None else round(self.ondemand_equivalent, 6),
        }


@dataclass
class Snapshot:
    """What a live view shows, handed to `on_update` about once per poll."""

    job: Job
    attempts: list[Attempt]
    heartbeat: dict[str, Any] | None
    spent: float
    ondemand_equivalent: float | None
    now: float


class ControllerBusy(Exception):
    """Another live controller is driving this job."""


class JobFinished(Exception):
    def __init__(self, status: JobStatus, exit_code: int, reason: str, job_exit_code: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.exit_code = exit_code
        self.reason = reason
        self.job_exit_code = job_exit_code


@dataclass
class ControllerOptions:
    poll_interval: float = 0.5
    capacity_wait: float = 600.0  # real seconds to keep retrying when no candidate has capacity
    launch_retry_backoff: float = 2.0
    heartbeat_timeout: float = 300.0  # real seconds without a heartbeat before an attempt is called lost
    upload_budget: float = 3.0
    heartbeat_interval: float = 1.0
    log_flush_interval: float = 0.5
    policy_interval: float = 5.0  # real seconds between asking the policy about a running instance
    drain_grace: float = 30.0  # seconds a drained instance gets to checkpoint (as a notice)
    container_cli: str | None = None
    container_args: list[str] = field(default_factory=list)


def new_job_id(name: str) -> str:
    return f"{name}-{time.strftime('%m%d')}-{secrets.token_hex(3)}"


class Controller:
    def __init__(
        self,
        state: State,
        *,
        providers: dict[str, Provider] | None = None,
        offers: Sequence[Offer] | None = None,
        store_url: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        options: ControllerOptions | None = None,
        on_update: Callable[[Snapshot], None] | None = None,
    ) -> None:
        self.state = state
        self.providers: dict[str, Provider] = dict(providers or {})
        self._offers = list(offers) if offers is not None else None
        self._cloud_offers: list[Offer] | None = None
        self.store_url = store_url
        self.clock = clock
        self.options = options or ControllerOptions()
        self.on_update = on_update
        self.pid = os.getpid()
        self._stores: dict[str, Store] = {}
        self._policies: dict[str, Policy] = {}
        self._agent_packed: Any = None  # spotrun.bundle.Packed of the Agent package, built on first cloud launch
        self._draining: dict[str, int] = {}  # job id -> attempt we asked to stop (a policy move)
        self._last_policy_check: dict[str, float] = {}

    # ================================================================== submit

    def submit(
        self,
        spec: JobSpec,
        *,
        job_id: str | None = None,
        progress: Callable[[str, int], Callable[[int], None]] | None = None,
    ) -> str:
        """Upload the code bundle, local data and the Agent's job file; record the job. Launches nothing.

        `progress(label, total_bytes)` may return a callback that is fed bytes as they upload.
        """
        from spotrun.agent.jobfile import AgentJob, DataItem
        from spotrun.bundle import pack_dir, pack_path
        from spotrun.paths import default_store_dir

        job_id = job_id or new_job_id(spec.name)
        store_url = self.store_url or spec.store or default_store_dir().as_uri()
        store = self._store(store_url)
        prefix = job_prefix(job_id)

        bundle_key = None
        if spec.workdir is not None:
            packed = pack_dir(spec.workdir)
            bundle_key = f"{prefix}/bundle/{packed.sha256}.tar.gz"
            _upload_once(store, bundle_key, packed.path, packed.size, "code", progress)

        data: list[DataItem] = []
        for source, target in spec.data.items():
            if "://" in source:
                data.append(DataItem(source=source, target=target, kind="url"))
                continue
            packed = pack_path(_resolve(spec, source))
            key = f"data/{packed.sha256}.tar.gz"  # store-wide: an unchanged dataset is never sent twice
            _upload_once(store, key, packed.path, packed.size, f"data {source}", progress)
            data.append(DataItem(source=key, target=target, kind="store"))

        agent_job = AgentJob(
            job_id=job_id,
            name=spec.name,
            bundle=bundle_key,
            setup=spec.setup,
            run=spec.run,
            image=spec.image,
            container_cli=self.options.container_cli,
            container_args=list(self.options.container_args),
            # Secret values never go to the store: the Agent takes them from its own environment.
            env={k: v for k, v in spec.env.items() if k not in spec.secret_env_keys} | checkpoint_env(spec),
            secret_env=sorted(spec.secret_env_keys),
            data=data,
            checkpoint_dir=spec.checkpoint.dir,
            keep=spec.checkpoint.keep,
            upload_budget=self.options.upload_budget,
            heartbeat_interval=self.options.heartbeat_interval,
            log_flush_interval=self.options.log_flush_interval,
        )
        store.put_bytes(f"{prefix}/job.json", agent_job.to_json().encode())
        self.state.create_job(
            job_id,
            spec.name,
            stored_spec(spec),
            store_url,
            self.clock.now(),
            str(spec.source_path) if spec.source_path else None,
        )
        return job_id

    # ================================================================== run

    def run(self, job_id: str) -> JobResult:
        """Drive the job until it is finished. Safe to call again after a crash (resume)."""
        now = self.clock.now()
        if not self.state.claim_controller(job_id, self.pid, now, stale_after=LEASE_STALE_AFTER):
            raise ControllerBusy(
                f"job {job_id} already has a live controller (pid {self.state.job(job_id).controller_pid})"
            )
        try:
            job = self.state.job(job_id)
            if not job.status.terminal:
                self._drive(job_id)
            return self.result(job_id)
        finally:
            self.state.release_controller(job_id, self.pid)

    def result(self, job_id: str) -> JobResult:
        job = self.state.job(job_id)
        attempts = self.state.attempts(job_id)
        now = self.clock.now()
        spent, ondemand = spend(attempts, now)
        return JobResult(
            job_id=job_id,
            status=job.status,
            exit_code=job.exit_code if job.exit_code is not None else EXIT_CODES.get(job.status, EXIT_FAILED),
            job_exit_code=job.job_exit_code,
            reason=job.reason,
            attempts=sum(1 for a in attempts if a.started_at is not None),
            preemptions=sum(1 for a in attempts if a.end_reason == "preempted"),
            spent=spent,
            ondemand_equivalent=ondemand,
        )

    def _drive(self, job_id: str) -> None:
        spec = planning_spec(self.state.job(job_id).spec)
        # Local instances inherit this process's environment: give them the secret values under
        # the names the workload reads (the Agent passes secret env on by name, never via the store).
        for key in spec.secret_env_keys:
            if spec.env.get(key):
                os.environ[key] = spec.env[key]
        self._sweep(job_id, spec, keep=None)
        capacity_since: float | None = None
        while True:
            try:
                now = self.clock.now()
                if not self.state.touch_controller(job_id, self.pid, now):
                    raise ControllerBusy(f"job {job_id} was taken over by another controller; this one stops")
                job = self.state.job(job_id)
                if job.cancel_requested:
                    raise JobFinished(JobStatus.CANCELLED, EXIT_CANCELLED, "cancelled by user")
                attempt = self.state.open_attempt(job_id)
                if attempt is None:
                    self._check_limits(job, spec, now)
                    launched = self._launch_next(job, spec)
                    if launched is None:  # the policy chose to wait
                        if spec.deadline is not None:
                            capacity_since = None  # the deadline bounds the wait (the policy keeps to it)
                        else:  # nothing else does: waiting counts toward the capacity wait limit
                            capacity_since = capacity_since if capacity_since is not None else now
                            if now - capacity_since >= self.options.capacity_wait:
                                raise JobFinished(
                                    JobStatus.NO_CAPACITY, EXIT_NO_CAPACITY, "no spot capacity within the wait limit"
                                )
                        self.clock.sleep(self.options.poll_interval)
                        continue
                    if launched:
                        capacity_since = None
                        continue
                    capacity_since = capacity_since if capacity_since is not None else now
                    if now - capacity_since >= self.options.capacity_wait:
                        raise JobFinished(
                            JobStatus.NO_CAPACITY,
                            EXIT_NO_CAPACITY,
                            "no capacity in any candidate within the wait limit",
                        )
                    self.clock.sleep(self.options.launch_retry_backoff)
                    continue
                if attempt.status == AttemptStatus.LAUNCHING:
                    self._finish_launch(job, spec, attempt)
                    continue
                self._watch(job, spec, attempt)
            except JobFinished as done:
                self._finish(job_id, spec, done)
                return

    # ------------------------------------------------------------------ launching

    def _launch_next(self, job: Job, spec: JobSpec) -> bool | None:
        """Ask the policy what to run, then try its choice and the other candidates of the same
        market best-first until one launches. False when none had capacity; None to wait."""
        candidates = self._candidates(job, spec)
        if not candidates:
            raise JobFinished(JobStatus.NO_CAPACITY, EXIT_NO_CAPACITY, "no offer fits the job's resources and limits")
        decision = self._decide(job, spec, candidates, current=None)
        if decision.kind == "wait":
            return None
        allow_ondemand = spec.resources.spot is not True or spec.recovery.on_demand_fallback
        candidates = order_for(decision, candidates, allow_ondemand=allow_ondemand) or candidates
        self._sweep(job.id, spec, keep=None)  # never two instances at once
        blocked: set[str] = set()  # "provider" or "provider/region" out of quota for this round
        for cand in candidates:
            offer = cand.offer
            if offer.provider in blocked or f"{offer.provider}/{offer.region}" in blocked:
                continue
            provider = self._provider(offer.provider, spec)
            target_store = store_for(offer.provider, spec, job.store_url)
            attempt = self.state.begin_attempt(
                job.id,
                provider=offer.provider,
                region=offer.region,
                zone=offer.zone,
                instance_type=offer.instance_type,
                spot=cand.spot,
                offer_key=offer.key,
                hourly_price=cand.hourly_price,
                ondemand_price=offer.ondemand_price,
                time_scale=float(getattr(provider, "time_scale", 1.0)),
                now=self.clock.now(),
                store_url=None if target_store == job.store_url else target_store,
            )
            outcome = self._try_launch(job, spec, attempt, offer, cand.spot)
            if outcome is True:
                return True
            if isinstance(outcome, QuotaExceeded):
                scope = outcome.scope
                blocked.add(offer.provider if scope == "provider" else f"{offer.provider}/{offer.region}")
        return False

    def _finish_launch(self, job: Job, spec: JobSpec, attempt: Attempt) -> None:
        """An attempt written as LAUNCHING by a controller that died mid-launch: re-issue it
        with the same client token (the provider returns the instance it already started)."""
        offer = self._offer_by_key(spec, attempt.offer_key, job.id)
        if offer is None:
            self.state.end_attempt(job.id, attempt.n, "launch_failed", self.clock.now(), detail="offer no longer known")
            return
        self._try_launch(job, spec, attempt, offer, attempt.spot)

    def _try_launch(self, job: Job, spec: JobSpec, attempt: Attempt, offer: Offer, spot: bool) -> bool | ProviderError:
        """True when the instance started; else the shared error that stopped it (after cleanup)."""
        provider = self._provider(offer.provider, spec)
        store_url = attempt.store_url or job.store_url
        try:
            self._bring_checkpoint(job, attempt, store_url)
        except Exception as e:  # noqa: BLE001 - any failure to move the state makes this offer unusable now
            self.state.end_attempt(job.id, attempt.n, "launch_failed", self.clock.now(), detail=f"store move: {e}")
            return ProviderError(str(e))
        cloud = offer.provider in CLOUDS
        boot = Boot(
            job_id=job.id,
            attempt=attempt.n,
            store_url=store_url,
            job_prefix=job_prefix(job.id),
            spotrun_spec=_spotrun_requirement(offer.provider if cloud else ""),
            spotrun_package=self._agent_package(store_url) if cloud else "",
            extra=offer.provider if cloud else "",
        )
        try:
            instance = self._with_retries(
                lambda: provider.launch(offer, spot=spot, boot=boot, client_token=attempt.client_token)
            )
        except AuthError as e:
            self.state.end_attempt(job.id, attempt.n, "launch_failed", self.clock.now(), detail=f"auth: {e}")
            raise JobFinished(
                JobStatus.FAILED, EXIT_BAD_INPUT, f"{offer.provider}: credentials rejected: {e}"
            ) from None
        except (NoCapacity, PriceTooLow, QuotaExceeded, BadRequest, Throttled) as e:
            kind = type(e).__name__
            if isinstance(e, NoCapacity):
                self._policy(job, spec).on_launch_failed(offer.key, self._job_hours(job, self.clock.now()))
            self.state.end_attempt(job.id, attempt.n, "launch_failed", self.clock.now(), detail=f"{kind}: {e}")
            self._sweep(job.id, spec, keep=None)
            return e
        except Exception as e:  # unknown failure: the instance may exist; find it and stop it
            self.state.end_attempt(job.id, attempt.n, "launch_failed", self.clock.now(), detail=f"error: {e!r}")
            self._sweep(job.id, spec, keep=None)
            return ProviderError(str(e))
        self.state.attempt_started(job.id, attempt.n, instance.instance_id, instance.to_dict(), self.clock.now())
        return True

    def _bring_checkpoint(self, job: Job, attempt: Attempt, target_url: str) -> None:
        """Relaunching on a cloud that keeps its own store: copy the job's files and its newest
        verified checkpoint there first (streamed, checked against the manifest)."""
        source_url = job.store_url
        for earlier in reversed(self.state.attempts(job.id)):
            if earlier.n < attempt.n and earlier.started_at is not None:
                source_url = earlier.store_url or job.store_url
                break
        if source_url == target_url:
            return
        from spotrun.transfer import move_job

        report = move_job(self._store(source_url), self._store(target_url), job.id)
        if report.checkpoint_step is None:
            what = "no complete checkpoint (starting from scratch)"
        else:
            what = f"checkpoint step {report.checkpoint_step} (verified against its manifest)"
        torn = f"; skipped torn steps {list(report.torn_steps)}" if report.torn_steps else ""
        self.state.add_event(
            job.id,
            self.clock.now(),
            "store_move",
            f"attempt {attempt.n}: moved {what} and the job's files ({report.bytes_copied / 1e6:.1f} MB) "
            f"from {source_url} to {target_url}{torn}",
            {
                "attempt": attempt.n,
                "bytes": report.bytes_copied,
                "step": report.checkpoint_step,
                "verified": report.verified,
                "torn_steps": list(report.torn_steps),
                "skipped": report.objects_skipped,
            },
        )

    def _agent_package(self, store_url: str) -> str:
        """The store URL of this spotrun packed for a VM to install (uploaded once per code version)."""
        from spotrun import agent_package

        if self._agent_packed is None:
            self._agent_packed = agent_package.build()
        key = agent_package.package_key(self._agent_packed.sha256)
        store = self._store(store_url)
        if not store.exists(key):
            store.put_file(key, self._agent_packed.path)
        return f"{store_url.rstrip('/')}/{key}"

    def _with_retries(self, call: Callable[[], Instance]) -> Instance:
        delay = 1.0
        for _ in range(4):
            try:
                return call()
            except Throttled:
                self.clock.sleep(delay)
                delay *= 2
        return call()

    # ------------------------------------------------------------------ watching

    def _watch(self, job: Job, spec: JobSpec, attempt: Attempt) -> None:
        assert attempt.instance is not None
        instance = Instance.from_dict(attempt.instance)
        provider = self._provider(attempt.provider, spec)
        try:
            st = provider.poll(instance)
        except ProviderError as e:
            self.state.add_event(job.id, self.clock.now(), "poll_error", f"poll failed: {e}")
            st = InstanceState(InstanceStatus.RUNNING)
        store = self._store(attempt.store_url or job.store_url)
        exit_rec = _read_json(store, f"{job_prefix(job.id)}/attempts/{attempt.n}/exit")
        now = self.clock.now()

        # "terminated": the Agent itself was told to stop (the VM shutting down): like a preemption.
        preempted = exit_rec is not None and exit_rec.get("reason") in ("preempted", "terminated")
        draining = self._draining.get(job.id) == attempt.n
        ended = st.status in (InstanceStatus.PREEMPTED, InstanceStatus.TERMINATED, InstanceStatus.FAILED)
        if draining and (preempted or ended):  # we asked it to stop: the policy moved the job
            self._end(provider, instance, job, attempt, "switched", exit_rec, st, detail="moved by the policy")
            return
        if preempted or st.status == InstanceStatus.PREEMPTED:
            self._policy(job, spec).on_preempted(attempt.offer_key, self._job_hours(job, now))
            self._end(provider, instance, job, attempt, "preempted", exit_rec, st)
            return
        if exit_rec is not None or st.status == InstanceStatus.EXITED:
            code = exit_rec.get("code") if exit_rec else st.exit_code
            code = 1 if code is None else int(code)
            if exit_rec is not None and exit_rec.get("reason") not in (None, "completed") and code == 0:
                code = EXIT_AGENT_ERROR  # e.g. the outputs could not be uploaded: not a success
            if code == 0:
                self._end(provider, instance, job, attempt, "completed", exit_rec, st, code=0)
                raise JobFinished(JobStatus.SUCCEEDED, EXIT_OK, "completed", job_exit_code=0)
            self._end(provider, instance, job, attempt, "failed", exit_rec, st, code=code)
            failures = sum(1 for a in self.state.attempts(job.id) if a.end_reason == "failed")
            if failures > spec.recovery.max_restarts:
                limit = spec.recovery.max_restarts
                reason = f"workload exited with code {code} ({failures} failures > max_restarts {limit})"
                raise JobFinished(JobStatus.FAILED, EXIT_FAILED, reason, job_exit_code=code)
            return
        if st.status in (InstanceStatus.TERMINATED, InstanceStatus.FAILED):
            self._end(provider, instance, job, attempt, "lost", exit_rec, st)
            return

        heartbeat = _read_json(store, f"{job_prefix(job.id)}/attempts/{attempt.n}/heartbeat")
        self._check_heartbeat(provider, instance, job, attempt, st, heartbeat, now)
        self._check_limits(job, spec, now)
        self._reconsider(job, spec, attempt, provider, instance, st, now)
        self._notify(job.id, heartbeat)
        self.clock.sleep(self.options.poll_interval)

    def _reconsider(
        self,
        job: Job,
        spec: JobSpec,
        attempt: Attempt,
        provider: Provider,
        instance: Instance,
        st: InstanceState,
        now: float,
    ) -> None:
        """Every `policy_interval`, ask the policy whether the running instance is still the right
        one (e.g. on-demand is needed to make the deadline, or back to spot once a zone proves
        stable). A different answer drains the instance: the Agent checkpoints as on a notice,
        and the next launch follows the policy."""
        if st.status != InstanceStatus.RUNNING or self._draining.get(job.id) == attempt.n:
            return
        if now - self._last_policy_check.get(job.id, 0.0) < self.options.policy_interval:
            return
        self._last_policy_check[job.id] = now
        current = Decision("spot" if attempt.spot else "ondemand", attempt.offer_key)
        decision = self._decide(job, spec, self._candidates(job, spec), current=current)
        if decision == current or (decision.kind == current.kind and decision.zone is None):
            return
        self._draining[job.id] = attempt.n
        self.state.add_event(
            job.id, now, "policy", f"attempt {attempt.n}: policy {spec.recovery.policy} moves the job to {decision}"
        )
        provider.drain(instance, self.options.drain_grace)

    def _decide(self, job: Job, spec: JobSpec, candidates: Sequence[Candidate], current: Decision | None) -> Decision:
        now = self.clock.now()
        attempts = self.state.attempts(job.id)
        scale = attempts[-1].time_scale if attempts else self._time_scale(spec)
        cooling = self._cooling_keys(spec, attempts, now)
        obs = observation(
            candidates,
            now_h=self._elapsed_job_seconds(job, attempts, now) / 3600.0,
            progress=self._progress(job, attempts),
            deadline_h=None if spec.deadline is None else spec.deadline / 3600.0,
            current=current,
            cooling=cooling,
            unavailable={a.offer_key for a in attempts if a.end_reason == "launch_failed"} & cooling,
            step_h=self.options.poll_interval * scale / 3600.0,
        )
        return self._policy(job, spec).decide(obs)

    def _policy(self, job: Job, spec: JobSpec) -> Policy:
        if job.id not in self._policies:
            attempts = self.state.attempts(job.id)
            hours = {a.n: self._job_hours(job, a.ended_at or a.created_at) for a in attempts}
            self._policies[job.id] = make_job_policy(spec.recovery.policy, attempts, hours)
        return self._policies[job.id]

    def _job_hours(self, job: Job, at: float) -> float:
        attempts = self.state.attempts(job.id)
        return self._elapsed_job_seconds(job, attempts, at) / 3600.0

    def _time_scale(self, spec: JobSpec) -> float:
        if allowed_providers(spec) == ["local"]:
            return float(getattr(self._provider("local", spec), "time_scale", 1.0))
        return 1.0

    def _check_heartbeat(
        self,
        provider: Provider,
        instance: Instance,
        job: Job,
        attempt: Attempt,
        st: InstanceState,
        heartbeat: dict[str, Any] | None,
        now: float,
    ) -> None:
        if st.status != InstanceStatus.RUNNING or attempt.started_at is None:
            return
        last = float(heartbeat["at"]) if heartbeat and "at" in heartbeat else attempt.started_at
        if now - last > self.options.heartbeat_timeout:
            self._end(provider, instance, job, attempt, "lost", None, st, detail="no heartbeat")

    def _end(
        self,
        provider: Provider,
        instance: Instance,
        job: Job,
        attempt: Attempt,
        reason: str,
        exit_rec: dict[str, Any] | None,
        st: InstanceState,
        *,
        code: int | None = None,
        detail: str = "",
    ) -> None:
        """Stop billing first (terminate is idempotent), then record the end of the attempt. If the
        cloud refuses to terminate now, the attempt stays open and the next poll tries again."""
        if not self._terminate(provider, instance, job.id):
            return
        if not detail:
            detail = st.reason or (f"checkpoint step {exit_rec.get('checkpoint_step')}" if exit_rec else "")
        self.state.end_attempt(job.id, attempt.n, reason, self.clock.now(), exit_code=code, detail=detail)

    def _terminate(self, provider: Provider, instance: Instance, job_id: str) -> bool:
        try:
            provider.terminate(instance)
            return True
        except ProviderError as e:
            self.state.add_event(
                job_id, self.clock.now(), "terminate_error", f"terminating {instance.instance_id} failed: {e}"
            )
            self.clock.sleep(self.options.launch_retry_backoff)
            return False

    def _check_limits(self, job: Job, spec: JobSpec, now: float) -> None:
        attempts = self.state.attempts(job.id)
        spent, _ = spend(attempts, now)
        if spec.budget is not None and spent >= spec.budget:
            raise JobFinished(
                JobStatus.BUDGET_EXHAUSTED, EXIT_BUDGET, f"budget ${spec.budget:.2f} spent (${spent:.2f})"
            )
        if spec.deadline is not None and self._elapsed_job_seconds(job, attempts, now) >= spec.deadline:
            raise JobFinished(JobStatus.DEADLINE_EXCEEDED, EXIT_BUDGET, f"deadline of {spec.deadline:.0f}s passed")
        limit = spec.recovery.max_preemptions
        preemptions = sum(1 for a in attempts if a.end_reason == "preempted")
        if limit is not None and preemptions > limit:
            raise JobFinished(JobStatus.FAILED, EXIT_FAILED, f"{preemptions} preemptions > max_preemptions {limit}")

    def _elapsed_job_seconds(self, job: Job, attempts: list[Attempt], now: float) -> float:
        """Wall time since submission, in the market's time (simulated for the local provider)."""
        scale = attempts[-1].time_scale if attempts else 1.0
        return (now - job.created_at) * scale

    # ------------------------------------------------------------------ finishing & cleanup

    def _finish(self, job_id: str, spec: JobSpec, done: JobFinished) -> None:
        attempt = self.state.open_attempt(job_id)
        if attempt is not None:
            reason = {JobStatus.CANCELLED: "cancelled"}.get(done.status, done.status.value.lower())
            if attempt.instance is not None:
                instance = Instance.from_dict(attempt.instance)
                provider = self._provider(attempt.provider, spec)
                for _ in range(FINISH_TERMINATE_TRIES):
                    if self._terminate(provider, instance, job_id):
                        break
                else:
                    # Leave the attempt open and the job unfinished: State still knows the instance,
                    # and `spotrun cancel` or `launch --resume` will try again.
                    self.state.add_event(
                        job_id, self.clock.now(), "cleanup", f"instance {instance.instance_id} could not be "
                        f"terminated; run `spotrun cancel {job_id}` to retry",
                    )  # fmt: skip
                    return
            self.state.end_attempt(job_id, attempt.n, reason, self.clock.now())
        self._sweep(job_id, spec, keep=None)
        for name in sorted({a.provider for a in self.state.attempts(job_id)}):
            try:
                self._provider(name, spec).release_job(job_id)
            except ProviderError as e:
                self.state.add_event(job_id, self.clock.now(), "release_error", f"{name}: {e}")
        self.state.set_job_status(
            job_id,
            done.status,
            self.clock.now(),
            reason=done.reason,
            exit_code=done.exit_code,
            job_exit_code=done.job_exit_code,
        )
        self._notify(job_id, None)

    def _sweep(self, job_id: str, spec: JobSpec, keep: str | None) -> None:
        """Terminate every instance a provider holds for this job, except `keep` (an instance id)."""
        open_attempt = self.state.open_attempt(job_id)
        protected = {keep} if keep else set()
        if open_attempt is not None and open_attempt.instance_id:
            protected.add(open_attempt.instance_id)
        names = {a.provider for a in self.state.attempts(job_id)}
        for name in sorted(names):
            provider = self._provider(name, spec)
            try:
                owned = provider.list_owned(job_id)
            except ProviderError as e:
                self.state.add_event(job_id, self.clock.now(), "sweep_error", f"{name}: {e}")
                continue
            for inst in owned:
                if inst.instance_id in protected:
                    continue
                if open_attempt is not None and open_attempt.instance_id is None and inst.attempt == open_attempt.n:
                    continue  # launched by a controller that died before recording it: adopted next
                if self._terminate(provider, inst, job_id):
                    self.state.add_event(
                        job_id, self.clock.now(), "sweep", f"terminated stray instance {inst.instance_id} ({name})"
                    )

    # ------------------------------------------------------------------ planning

    def _candidates(self, job: Job, spec: JobSpec) -> list[Candidate]:
        offers = self.offers_for(spec, job.id)
        attempts = self.state.attempts(job.id)
        now = self.clock.now()
        cooling = self._cooling_keys(spec, attempts, now)
        spent, _ = spend(attempts, now)
        progress = self._progress(job, attempts)
        elapsed_h = self._elapsed_job_seconds(job, attempts, now) / 3600.0
        relaunch = bool(attempts)
        fresh = self._ranked(spec, offers, cooling, elapsed_h, progress, spent, relaunch)
        if not cooling:
            return fresh
        # Zones in cooldown are a last resort, not forbidden: better a volatile zone than none.
        everything = self._ranked(spec, offers, (), elapsed_h, progress, spent, relaunch)
        return fresh + [c for c in everything if c.offer.key in cooling]

    @staticmethod
    def _ranked(
        spec: JobSpec,
        offers: Sequence[Offer],
        exclude: Collection[str],
        elapsed_h: float,
        progress: float,
        spent: float,
        relaunch: bool,
    ) -> list[Candidate]:
        """The planner's ranking. On a relaunch, offers that now miss the deadline or budget are
        still tried after the ones that meet them: the limits themselves are enforced as the job
        runs, and stopping a half-done job because a plan looks tight would waste what was spent."""
        from spotrun.planner import plan

        result = plan(spec, offers, exclude=exclude, elapsed_hours=elapsed_h, progress=progress, spent=spent)
        return list(result.candidates) + (list(result.near_misses) if relaunch else [])

    def _cooling_keys(self, spec: JobSpec, attempts: list[Attempt], now: float) -> set[str]:
        keys = set()
        for a in attempts:
            if a.end_reason not in ("preempted", "launch_failed", "lost"):
                continue
            ended = a.ended_at if a.ended_at is not None else a.created_at
            cooldown = spec.recovery.zone_cooldown / max(a.time_scale, 1e-9)
            if a.end_reason == "launch_failed":
                cooldown = min(cooldown, 60.0 / max(a.time_scale, 1e-9) if a.time_scale > 1 else 300.0)
            if now - ended < cooldown:
                keys.add(a.offer_key)
        return keys

    def _progress(self, job: Job, attempts: list[Attempt]) -> float:
        if not attempts:
            return 0.0
        last = attempts[-1]
        hb = _read_json(
            self._store(last.store_url or job.store_url), f"{job_prefix(job.id)}/attempts/{last.n}/heartbeat"
        )
        prog = (hb or {}).get("progress") or {}
        step, total = prog.get("step"), prog.get("total")
        if isinstance(step, int | float) and isinstance(total, int | float) and total > 0:
            return min(1.0, max(0.0, step / total))
        return 0.0

    def offers_for(self, spec: JobSpec, job_id: str | None = None) -> list[Offer]:
        """Every offer the spec's providers make. Cloud offers come from the catalog (read once);
        the local market's are asked afresh, as of the job's market time (trace-driven prices)."""
        if self._offers is not None:
            return self._offers
        names = allowed_providers(spec)
        clouds = [n for n in names if n in CLOUDS]
        if clouds and self._cloud_offers is None:
            from spotrun.catalog import load_offers

            self._cloud_offers = load_offers(clouds)
        offers = list(self._cloud_offers or [])
        if "local" in names:
            offers += self._provider("local", spec).market_offers(job_id)  # type: ignore[attr-defined]
        return offers

    def _offer_by_key(self, spec: JobSpec, key: str, job_id: str) -> Offer | None:
        return next((o for o in self.offers_for(spec, job_id) if o.key == key), None)

    # ------------------------------------------------------------------ helpers

    def _provider(self, name: str, spec: JobSpec) -> Provider:
        if name not in self.providers:
            from spotrun.providers import get_provider

            self.providers[name] = get_provider(name, **provider_options(name, spec))
        return self.providers[name]

    def _store(self, url: str) -> Store:
        if url not in self._stores:
            self._stores[url] = open_store(url)
        return self._stores[url]

    def _notify(self, job_id: str, heartbeat: dict[str, Any] | None) -> None:
        if self.on_update is None:
            return
        now = self.clock.now()
        attempts = self.state.attempts(job_id)
        spent, ondemand = spend(attempts, now)
        self.on_update(Snapshot(self.state.job(job_id), attempts, heartbeat, spent, ondemand, now))


# ====================================================================== module helpers


def spend(attempts: Sequence[Attempt], now: float) -> tuple[float, float | None]:
    """USD spent so far, and what the same hours would have cost on demand (None if unknown)."""
    spent = sum(a.cost_at(now) for a in attempts)
    ondemand = 0.0
    for a in attempts:
        c = a.ondemand_cost_at(now)
        if c is None:
            return spent, None
        ondemand += c
    return spent, ondemand


def allowed_providers(spec: JobSpec) -> list[str]:
    """The spec's providers, or `local` when it names none (the default when no cloud is configured)."""
    return list(spec.resources.providers or ["local"])


def store_for(provider: str, spec: JobSpec, default: str) -> str:
    """The store a provider's instances use: its spec section's `store`, else the job's."""
    section = getattr(spec, provider, None) if provider in CLOUDS else None
    return getattr(section, "store", None) or default


def provider_options(name: str, spec: JobSpec) -> dict[str, Any]:
    """Constructor options for a provider, from the spec's provider section."""
    if name == "local":
        market = spec.local.market if spec.local is not None else None
        return {"market": market} if market is not None else {}
    section = getattr(spec, name, None)
    fields = section.model_dump(exclude={"store"}) if section is not None else {}
    options = {k: v for k, v in fields.items() if v is not None}
    if name == "aws" and section is not None and section.store:
        options["store_url"] = section.store
    if spec.resources.disk:
        options.setdefault("disk_gb", spec.resources.disk)
    if name in ("aws", "azure") and spec.resources.max_price is not None:
        options.setdefault("max_price", spec.resources.max_price)
    return options


def checkpoint_env(spec: JobSpec) -> dict[str, str]:
    """The spec's checkpoint settings, for the checkpoint library's defaults (SPOTRUN_CHECKPOINT_*)."""
    env = {"SPOTRUN_CHECKPOINT_KEEP": str(spec.checkpoint.keep)}
    if spec.checkpoint.interval is not None:
        env["SPOTRUN_CHECKPOINT_INTERVAL"] = f"{spec.checkpoint.interval:g}"
    return env


def stored_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as kept in State: JSON holding no secret value (`${VAR}` env stays a template)."""
    return spec.persistable()


class _AnyVariable(Mapping[str, str]):
    """The environment, where every variable exists (unset ones are empty): lets a job be
    cleaned up or planned from a shell that lacks its `${SECRET}`s."""

    def __getitem__(self, key: str) -> str:
        return os.environ.get(key, "")

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(os.environ)

    def __len__(self) -> int:
        return len(os.environ)


def planning_spec(data: dict[str, Any]) -> JobSpec:
    """Rebuild the spec from State for planning and limits. The code and data were shipped to the
    Store at submit time; local paths are not re-checked (they may be gone by now). A secret that
    this shell does not have is left empty rather than stopping a cancel or a resume."""
    from spotrun.spec import JobSpec, SpecError

    try:
        return JobSpec.from_persisted(data)
    except SpecError:
        return JobSpec.from_persisted(data, environ=_AnyVariable())


def _resolve(spec: JobSpec, source: str) -> Any:
    from pathlib import Path

    p = Path(source).expanduser()
    return p if p.is_absolute() else (spec.base_dir / p)


def _upload_once(
    store: Store,
    key: str,
    path: Any,
    size: int,
    label: str,
    progress: Callable[[str, int], Callable[[int], None]] | None,
) -> None:
    if store.exists(key):
        return
    callback = progress(label, size) if progress else None
    store.put_file(key, path, progress=callback)


def _read_json(store: Store, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_bytes(key))
    except NotFound:
        return None
    except (StoreError, ValueError, OSError):  # a transient store error: try again at the next poll
        return None


def _spotrun_requirement(extra: str = "") -> str:
    """What a VM installs when it cannot fetch the Agent package from the store."""
    from spotrun import __version__

    return os.environ.get("SPOTRUN_PIP_SPEC", f"spotrun{f'[{extra}]' if extra else ''}=={__version__}")


def main(argv: list[str] | None = None) -> int:
    """`python -m spotrun.controller JOB_ID`: the detached controller (`spotrun launch --detach`)."""
    import sys

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m spotrun.controller JOB_ID", file=sys.stderr)
        return EXIT_BAD_INPUT
    state = State.open_default()
    try:
        return Controller(state).run(args[0]).exit_code
    except ControllerBusy as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
