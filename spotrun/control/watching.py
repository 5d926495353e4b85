"""Watching a running attempt: poll the instance and the Agent's exit record and heartbeat, tell a
preemption from a completion, a workload failure or a lost instance, enforce the job's limits, and
re-ask the relaunch policy now and then whether the running instance is still the right one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from spotrun.clouds.base import (
    Instance,
    InstanceState,
    InstanceStatus,
    Provider,
    ProviderError,
)
from spotrun.clouds.store import job_prefix
from spotrun.control.core import ControllerCore
from spotrun.control.decide import job_history, make_job_policy, observation
from spotrun.control.gang import gang_exit
from spotrun.control.outcome import (
    EXIT_AGENT_ERROR,
    EXIT_BUDGET,
    EXIT_FAILED,
    EXIT_OK,
    INFRA_RETRIES,
    JobFinished,
    spend,
)
from spotrun.control.records import ExitRecord, read_exit, read_heartbeat
from spotrun.control.specs import allowed_providers
from spotrun.control.state import Attempt, Job, JobStatus
from spotrun.policies.base import Decision, Policy

if TYPE_CHECKING:
    from spotrun.planner import Candidate
    from spotrun.spec import JobSpec


class WatchingMixin(ControllerCore):
    def _watch(self, job: Job, spec: JobSpec, attempt: Attempt) -> None:
        assert attempt.instance is not None
        instance = Instance.from_dict(attempt.instance)
        provider = self._provider(attempt.provider, spec)
        try:
            st = provider.poll(instance)
        except ProviderError as e:
            self.state.add_event(job.id, self.clock.now(), "poll_error", f"poll failed: {e}")
            st = InstanceState(InstanceStatus.RUNNING)
        except Exception as e:  # noqa: BLE001 - e.g. a provider choking on what an instance wrote: never crash the loop
            self.state.add_event(job.id, self.clock.now(), "poll_error", f"poll failed: {type(e).__name__}: {e}")
            st = InstanceState(InstanceStatus.RUNNING)
        store = self._store(attempt.store_url or job.store_url)
        exit_rec = gang_exit(read_exit(store, f"{job_prefix(job.id)}/attempts/{attempt.n}/exit"), st)
        now = self.clock.now()

        # "terminated": the Agent itself was told to stop (the VM shutting down): like a preemption.
        preempted = exit_rec is not None and exit_rec.preempted
        ended = st.status in (InstanceStatus.PREEMPTED, InstanceStatus.TERMINATED, InstanceStatus.FAILED)
        # The Agent's own word wins over the instance's state: a workload that completed just as
        # its instance was preempted (or drained) has completed, and must never run again.
        finished = exit_rec is not None and not exit_rec.preempted
        stopping = self._limit_stop.get(job.id)
        if stopping is not None and stopping[0] == attempt.n and not finished:
            # a budget/deadline stop: the Agent was asked for a last checkpoint; stop once it is done
            done, since = stopping[1], stopping[2]
            if preempted or ended or exit_rec is not None or now - since >= self.options.drain_grace:
                self._end(provider, instance, job, attempt, "stopped", exit_rec, st, detail=done.reason)
                self._limit_stop.pop(job.id, None)
                raise done
        draining = self._draining.get(job.id) == attempt.n
        if draining and not finished and (preempted or ended):  # we asked it to stop: the policy moved it
            self._end(provider, instance, job, attempt, "switched", exit_rec, st, detail="moved by the policy")
            return
        if preempted or (st.status == InstanceStatus.PREEMPTED and not finished):
            self._policy(job, spec).on_preempted(attempt.offer_key, self._job_hours(job, now))
            self._end(provider, instance, job, attempt, "preempted", exit_rec, st)
            return
        if exit_rec is None and st.status == InstanceStatus.EXITED and st.exit_code in (None, EXIT_AGENT_ERROR):
            # The Agent always writes its record last; without one, it could not (a read-only or full
            # store when it says 70) or it died: neither is the workload's doing.
            exit_rec = ExitRecord(
                None,
                "agent-error",
                error=f"the Agent exited ({st.exit_code}) without writing its exit record "
                "(is the store read-only or full?)",
                kind="store" if st.exit_code == EXIT_AGENT_ERROR else "agent",
            )
        if exit_rec is not None and exit_rec.kind == "boot":  # e.g. the GPU driver never showed the GPUs
            why = f"the Agent found the VM unfit: {exit_rec.error or 'boot failed'}"
            self._boot_failed(job, spec, attempt, provider, instance, st, why, "", now)
            return
        if exit_rec is not None and exit_rec.infrastructure:
            self._infra_failure(provider, instance, job, spec, attempt, exit_rec, st, store.url)
            return
        if exit_rec is not None or st.status == InstanceStatus.EXITED:
            code = exit_rec.code if exit_rec is not None else st.exit_code
            code = 1 if code is None else code
            if exit_rec is not None and exit_rec.reason != "completed" and code == 0:
                code = EXIT_AGENT_ERROR  # e.g. the outputs could not be uploaded: not a success
            if code == 0:
                self._end(provider, instance, job, attempt, "completed", exit_rec, st, code=0)
                raise JobFinished(JobStatus.SUCCEEDED, EXIT_OK, "completed", job_exit_code=0)
            self._end(provider, instance, job, attempt, "failed", exit_rec, st, code=code)
            failures = sum(1 for a in self.state.attempts(job.id) if a.end_reason == "failed")
            if failures > spec.recovery.max_restarts:
                limit = spec.recovery.max_restarts
                reason = f"workload exited with code {code} ({failures} failures > max_restarts {limit})"
                if exit_rec is not None and exit_rec.error:
                    reason += f": {exit_rec.error}"
                raise JobFinished(JobStatus.FAILED, EXIT_FAILED, reason, job_exit_code=code)
            return
        heartbeat = read_heartbeat(store, f"{job_prefix(job.id)}/attempts/{attempt.n}/heartbeat")
        if heartbeat is None and self._check_boot(job, spec, attempt, provider, instance, st, store, now):
            return
        if st.status in (InstanceStatus.TERMINATED, InstanceStatus.FAILED):
            self._end(provider, instance, job, attempt, "lost", exit_rec, st)
            return

        self._check_heartbeat(provider, instance, job, attempt, st, heartbeat, now)
        self._check_limits(job, spec, now, running=(provider, instance, attempt))
        self._reconsider(job, spec, attempt, provider, instance, st, now)
        self._notify(job.id, heartbeat)
        self.clock.sleep(self.options.poll_interval)

    def _infra_failure(
        self,
        provider: Provider,
        instance: Instance,
        job: Job,
        spec: JobSpec,
        attempt: Attempt,
        rec: ExitRecord,
        st: InstanceState,
        store_url: str,
    ) -> None:
        """The Agent could not run the job (store, bundle, data, its own error): not the workload's
        fault. Retried with a growing pause, never counted against max_restarts; after
        INFRA_RETRIES in a row the job fails with a reason naming what broke."""
        what = {"store": f"store {store_url}", "bundle": "code bundle", "data": "data"}.get(rec.kind, "Agent")
        detail = f"{what}: {rec.error or rec.reason}"
        self._end(provider, instance, job, attempt, "agent_error", None, st, detail=detail)
        streak = 0
        for a in reversed(self.state.attempts(job.id)):
            if a.end_reason == "agent_error":
                streak += 1
            elif a.end_reason in ("completed", "failed", "preempted", "lost", "switched", "stopped"):
                break
        if streak > INFRA_RETRIES:
            reason = f"infrastructure failure, not the workload ({streak} attempts): {detail}"
            raise JobFinished(JobStatus.FAILED, EXIT_FAILED, reason)
        self.state.add_event(
            job.id, self.clock.now(), "infra", f"attempt {attempt.n}: {detail}; retrying ({streak}/{INFRA_RETRIES})"
        )
        self.clock.sleep(min(60.0, self.options.launch_retry_backoff * 2 ** (streak - 1)))

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
            history=job_history(attempts, lambda at: self._elapsed_job_seconds(job, attempts, at) / 3600.0),
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
        if st.status != InstanceStatus.RUNNING or attempt.started_at is None or heartbeat is None:
            return  # before the first heartbeat, the boot allowance applies (_check_boot)
        last = heartbeat["at"] if heartbeat.get("at") is not None else attempt.started_at
        if now - last > self.options.heartbeat_timeout:
            self._end(provider, instance, job, attempt, "lost", None, st, detail="no heartbeat")

    # ------------------------------------------------------------------ boot failures

    @property
    def _boot_clock(self) -> dict[tuple[str, int], float]:
        """(job, attempt) -> when the cloud first reported its VM running (this controller's view)."""
        return self.__dict__.setdefault("_boot_clock_", {})

    def _boot_timeout(self, spec: JobSpec, provider: Provider) -> float:
        """`recovery.boot_timeout`, else the cloud's default (`Provider.boot_timeout`), else the
        controller's heartbeat timeout (the local provider)."""
        chosen = spec.recovery.boot_timeout or getattr(provider, "boot_timeout", None)
        return float(chosen or self.options.heartbeat_timeout)

    def _check_boot(
        self,
        job: Job,
        spec: JobSpec,
        attempt: Attempt,
        provider: Provider,
        instance: Instance,
        st: InstanceState,
        store: Any,
        now: float,
    ) -> bool:
        """An attempt whose Agent has not sent its first heartbeat is still booting. Its boot failed
        when the VM went away, or when the boot allowance passed since the cloud first reported it
        running (or since launch, for a VM the cloud never reported running). A boot failure ends
        the attempt with the boot log's last lines; `max_boot_failures` of them fail the job."""
        key = (job.id, attempt.n)
        if st.status == InstanceStatus.RUNNING:
            self._boot_clock.setdefault(key, now)
        gone = st.status in (InstanceStatus.TERMINATED, InstanceStatus.FAILED)
        timeout = self._boot_timeout(spec, provider)
        since = self._boot_clock.get(key, attempt.started_at)
        if not gone and (since is None or now - since <= timeout):
            return False
        if gone:
            why = "the VM stopped before the Agent started"
        elif key in self._boot_clock:
            why = f"no Agent {timeout:.0f}s after the cloud reported the VM running (recovery.boot_timeout)"
        else:
            why = f"the cloud did not report the VM running within {timeout:.0f}s (recovery.boot_timeout)"
        tail = self._boot_log_tail(job, attempt, provider, instance, store)
        self._boot_failed(job, spec, attempt, provider, instance, st, why, tail, now)
        return True

    def _boot_failed(
        self,
        job: Job,
        spec: JobSpec,
        attempt: Attempt,
        provider: Provider,
        instance: Instance,
        st: InstanceState,
        why: str,
        tail: str,
        now: float,
    ) -> None:
        """End the attempt as a boot failure (the controller saw no Agent, or the Agent found the VM
        without what the offer promised); `max_boot_failures` of them fail the job."""
        key = (job.id, attempt.n)
        last = tail.splitlines()[-1] if tail else "no boot log"
        self._end(provider, instance, job, attempt, "boot_failed", None, st, detail=f"{why}; {last}" if tail else why)
        if attempt.n != getattr(self.state.open_attempt(job.id), "n", None):  # the attempt did end
            self._boot_clock.pop(key, None)
            self.state.add_event(job.id, now, "boot_failed", f"attempt {attempt.n}: {why}\n{tail}")
            failures = sum(1 for a in self.state.attempts(job.id) if a.end_reason == "boot_failed")
            limit = spec.recovery.max_boot_failures
            if failures >= limit:
                reason = f"{failures} boot failures (max_boot_failures {limit}): {why}. The boot log ends:\n{tail}"
                raise JobFinished(JobStatus.FAILED, EXIT_FAILED, reason)

    def _boot_log_tail(
        self, job: Job, attempt: Attempt, provider: Provider, instance: Instance, store: Any, lines: int = 15
    ) -> str:
        """The last lines of the VM's boot log: shipped by the bootstrap to the store, else read from
        the cloud's console (serial port) output."""
        from spotrun.clouds.store import NotFound

        text = ""
        try:
            text = store.get_bytes(f"{job_prefix(job.id)}/attempts/{attempt.n}/boot.log").decode(errors="replace")
        except NotFound:
            pass
        except Exception as e:  # noqa: BLE001 -- the console may still have it
            self.state.add_event(job.id, self.clock.now(), "boot_log", f"reading boot.log failed: {e}")
        if not text.strip():
            try:
                text = provider.console_output(instance)
            except Exception as e:  # noqa: BLE001 -- a log we cannot read never stops the job's accounting
                self.state.add_event(job.id, self.clock.now(), "boot_log", f"reading the console failed: {e}")
        kept = [line.rstrip() for line in text.splitlines() if line.strip()]
        return "\n".join(kept[-lines:])

    def _check_limits(
        self,
        job: Job,
        spec: JobSpec,
        now: float,
        running: tuple[Provider, Instance, Attempt] | None = None,
    ) -> None:
        """Budget, deadline, preemption limits. The budget is checked against the spend at the next
        poll plus the time a last checkpoint takes, so the overspend is bounded; the deadline
        against the time at the next poll; with an instance running, it is first asked for a last checkpoint
        (drained as on a notice), and the job stops once that is done."""
        attempts = self.state.attempts(job.id)
        if any(a.end_reason == "completed" for a in attempts):
            raise JobFinished(JobStatus.SUCCEEDED, EXIT_OK, "completed", job_exit_code=0)
        spent, _ = spend(attempts, now)
        ahead = self.options.poll_interval + (self.options.drain_grace if running else 0.0)
        done: JobFinished | None = None
        if spec.budget is not None:
            rate = sum(a.hourly_price * a.time_scale for a in attempts if a.started_at and a.ended_at is None)
            projected = spent + rate * ahead / 3600.0
            if projected >= spec.budget:
                done = JobFinished(
                    JobStatus.BUDGET_EXHAUSTED,
                    EXIT_BUDGET,
                    f"budget ${spec.budget:.2f} spent (${spent:.2f}, ${projected:.2f} by the next check)",
                )
        if done is None and spec.deadline is not None:
            # One poll ahead only: stopping earlier would declare a miss that may not happen (the
            # drain grace, in real seconds, is hours of a fast simulated market); the last
            # checkpoint is then taken just past the deadline, which costs no more than the drain.
            scale = attempts[-1].time_scale if attempts else 1.0
            if self._elapsed_job_seconds(job, attempts, now) + self.options.poll_interval * scale >= spec.deadline:
                done = JobFinished(JobStatus.DEADLINE_EXCEEDED, EXIT_BUDGET, f"deadline of {spec.deadline:.0f}s passed")
        if done is not None:
            if running is None:
                raise done
            provider, instance, attempt = running
            if job.id not in self._limit_stop:
                self._limit_stop[job.id] = (attempt.n, done, now)
                self.state.add_event(job.id, now, "limit", f"{done.reason}: asking for a last checkpoint")
                try:
                    provider.drain(instance, self.options.drain_grace)
                except ProviderError as e:
                    self.state.add_event(job.id, now, "drain_error", f"drain failed: {e}")
                    raise done from None
            return
        limit = spec.recovery.max_preemptions
        preemptions = sum(1 for a in attempts if a.end_reason == "preempted")
        if limit is not None and preemptions > limit:
            raise JobFinished(JobStatus.FAILED, EXIT_FAILED, f"{preemptions} preemptions > max_preemptions {limit}")

    def _elapsed_job_seconds(self, job: Job, attempts: list[Attempt], now: float) -> float:
        """Wall time since submission, in the market's time (simulated for the local provider)."""
        scale = attempts[-1].time_scale if attempts else 1.0
        return (now - job.created_at) * scale
