"""Ending: an attempt (terminate first, then record why), the job (terminate, sweep, release the
job's cloud resources, record the final status), and the sweep that terminates every instance a
provider holds for the job that State does not know as the current one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spotrun.clouds.base import (
    Instance,
    InstanceState,
    Provider,
    ProviderError,
)
from spotrun.control.core import ControllerCore
from spotrun.control.outcome import (
    FINISH_TERMINATE_TRIES,
    JobFinished,
)
from spotrun.control.records import ExitRecord
from spotrun.control.state import Attempt, Job, JobStatus

if TYPE_CHECKING:
    from spotrun.spec import JobSpec


class EndingMixin(ControllerCore):
    def _end(
        self,
        provider: Provider,
        instance: Instance,
        job: Job,
        attempt: Attempt,
        reason: str,
        exit_rec: ExitRecord | None,
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
            step = exit_rec.checkpoint_step if exit_rec else None
            detail = st.reason or (f"checkpoint step {step}" if step is not None else "")
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
        self._delete_secrets(job_id, spec)
        self.state.set_job_status(
            job_id,
            done.status,
            self.clock.now(),
            reason=done.reason,
            exit_code=done.exit_code,
            job_exit_code=done.job_exit_code,
        )
        self._notify(job_id, None)

    def _delete_secrets(self, job_id: str, spec: JobSpec) -> None:
        """The job's `${VAR}` values leave every cloud's secret store (spotrun/control/secrets.py)."""
        from spotrun.control.secrets import delete_secrets

        delete_secrets(self.state, job_id, spec, self._provider, self.clock.now())

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
