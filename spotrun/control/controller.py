"""The state machine of a job: plan → launch (fail over) → watch → recover → … → done.

Every transition is written to State *before* the controller acts on it: an attempt row is
created (with its idempotency token) before `provider.launch` is called, so a controller that is
killed at any point and restarted (`spotrun launch --resume JOB`) re-issues the same launch
(which the provider deduplicates) or adopts the instance, and never starts a second one. After
every attempt, and on start, it sweeps `provider.list_owned(job)` and terminates any instance
State does not know as the current one: a failed launch never leaves a stray instance running.

Outcome → exit code (DESIGN.md): 0 succeeded, 1 failed, 2 bad input (incl. credentials),
3 no capacity, 4 budget or deadline, 130 cancelled.

The controller is cut along its seams, one module each (mixins over `ControllerCore`):
submitting (upload, record), planning (candidates), launching (policy choice, failover),
watching (poll, exit records, heartbeats, limits), ending (attempt and job, the sweep). This
module puts them together and holds the loop that drives a job.
"""

from __future__ import annotations

import os

from spotrun.clouds.local.launcher import SECRET_NAMES_ENV
from spotrun.control.core import ControllerCore, ControllerOptions
from spotrun.control.ending import EndingMixin
from spotrun.control.launching import LaunchingMixin
from spotrun.control.outcome import (
    EXIT_AGENT_ERROR,
    EXIT_BAD_INPUT,
    EXIT_BUDGET,
    EXIT_CANCELLED,
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_NO_CAPACITY,
    EXIT_OK,
    LEASE_STALE_AFTER,
    ControllerBusy,
    JobFinished,
    JobResult,
    Snapshot,
    spend,
)
from spotrun.control.planning import PlanningMixin
from spotrun.control.specs import (
    allowed_providers,
    checkpoint_env,
    planning_spec,
    provider_options,
    store_for,
    stored_spec,
)
from spotrun.control.state import AttemptStatus, JobStatus, State
from spotrun.control.submitting import SubmittingMixin, new_job_id
from spotrun.control.watching import WatchingMixin

__all__ = [
    "EXIT_AGENT_ERROR",
    "EXIT_BAD_INPUT",
    "EXIT_BUDGET",
    "EXIT_CANCELLED",
    "EXIT_CODES",
    "EXIT_FAILED",
    "EXIT_NO_CAPACITY",
    "EXIT_OK",
    "Controller",
    "ControllerBusy",
    "ControllerCore",
    "ControllerOptions",
    "JobFinished",
    "JobResult",
    "Snapshot",
    "allowed_providers",
    "checkpoint_env",
    "new_job_id",
    "planning_spec",
    "provider_options",
    "spend",
    "store_for",
    "stored_spec",
]


class Controller(SubmittingMixin, LaunchingMixin, WatchingMixin, EndingMixin, PlanningMixin, ControllerCore):
    """Drives jobs: `submit` records one, `run` drives it to the end (and resumes one after a crash)."""

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
        os.environ[SECRET_NAMES_ENV] = ",".join(sorted(spec.secret_env_keys))  # all a local instance inherits
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


def main(argv: list[str] | None = None) -> int:
    """`python -m spotrun.control.controller JOB_ID`: the detached controller (`spotrun launch --detach`)."""
    import sys

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m spotrun.control.controller JOB_ID", file=sys.stderr)
        return EXIT_BAD_INPUT
    state = State.open_default()
    try:
        return Controller(state).run(args[0]).exit_code
    except ControllerBusy as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
