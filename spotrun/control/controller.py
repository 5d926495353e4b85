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
from typing import TYPE_CHECKING

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
from spotrun.control.state import AttemptStatus, JobStatus
from spotrun.control.submitting import SubmittingMixin, new_job_id
from spotrun.control.watching import WatchingMixin

if TYPE_CHECKING:
    from spotrun.spec import JobSpec

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
            launch_failures=sum(1 for a in attempts if a.end_reason == "launch_failed"),
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
        wait = CapacityWait(self._capacity_wait(spec), self.options.launch_retry_backoff)
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
                    if launched:
                        wait.reset()
                        continue
                    if launched is None and spec.deadline is not None:
                        wait.reset()  # the policy waits, and the deadline bounds that wait (the policy keeps to it)
                        self._sleep_until_cancel(job_id, self.options.poll_interval)
                        continue
                    # No candidate had capacity (or the policy waits with no deadline to bound it).
                    delay = wait.next_delay(now, self._market_speed())
                    if delay is None:
                        what = "no spot capacity" if launched is None else "no capacity in any candidate"
                        raise JobFinished(
                            JobStatus.NO_CAPACITY,
                            EXIT_NO_CAPACITY,
                            f"{what} within recovery.capacity_wait ({wait.limit:g} s)",
                        )
                    if launched is False:
                        self.state.add_event(
                            job_id,
                            now,
                            "capacity_wait",
                            f"no capacity: trying again in {delay:.0f} s "
                            f"(waited {wait.waited(now):.0f} s of {wait.limit:g} s)",
                        )
                    self._sleep_until_cancel(job_id, delay if launched is False else self.options.poll_interval)
                    continue
                if attempt.status == AttemptStatus.LAUNCHING:
                    self._finish_launch(job, spec, attempt)
                    continue
                self._watch(job, spec, attempt)
            except JobFinished as done:
                self._finish(job_id, spec, done)
                return

    def _capacity_wait(self, spec: JobSpec) -> float:
        """The controller's own option when set (tests), else the spec's recovery.capacity_wait."""
        if self.options.capacity_wait is not None:
            return self.options.capacity_wait
        return float(spec.recovery.capacity_wait)

    def _market_speed(self) -> float:
        """How much faster than real time the markets tried so far run (1 on real clouds)."""
        return max((float(getattr(p, "time_scale", 1.0)) for p in self.providers.values()), default=1.0)

    def _sleep_until_cancel(self, job_id: str, seconds: float) -> None:
        """Sleep in short steps, so a cancel request during a long back-off is acted on promptly."""
        end = self.clock.now() + seconds
        while True:
            left = end - self.clock.now()
            if left <= 0:
                return
            self.clock.sleep(min(left, max(self.options.poll_interval, 0.05)))
            if self.state.job(job_id).cancel_requested:
                return


class CapacityWait:
    """How long to keep retrying while nothing has capacity: `limit` seconds from the first miss,
    with delays doubling from `first` up to MAX_BACKOFF (one launch per round, not one every 2 s).

    The limit is real seconds (also on the simulated market: it bounds how long a launch blocks).
    The back-off cap is market seconds: on a time-compressed market (the local provider's
    `time_scale`) rounds come as often, in the market's time, as on a real cloud."""

    MAX_BACKOFF = 60.0

    def __init__(self, limit: float, first: float) -> None:
        self.limit = limit
        self.first = max(first, 0.01)
        self.reset()

    def reset(self) -> None:
        self.since: float | None = None
        self.delay = self.first

    def waited(self, now: float) -> float:
        return 0.0 if self.since is None else now - self.since

    def next_delay(self, now: float, scale: float = 1.0) -> float | None:
        """Real seconds to wait before the next round, or None when the wait is used up."""
        scale = max(scale, 1e-9)
        if self.since is None:
            self.since = now
        left = self.limit - (now - self.since)
        if left <= 0:
            return None
        cap = max(self.first, self.MAX_BACKOFF / scale)
        delay = min(self.delay, left, cap)
        self.delay = min(self.delay * 2, cap)
        return delay


def main(argv: list[str] | None = None) -> int:
    """`python -m spotrun.control.controller JOB_ID`: the detached controller (`spotrun launch --detach`)."""
    import sys

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m spotrun.control.controller JOB_ID", file=sys.stderr)
        return EXIT_BAD_INPUT
    from spotrun.control.durable.state import DurableState

    state = DurableState.open_default()  # the detached controller: its record and lease in the store
    try:
        return Controller(state).run(args[0]).exit_code
    except ControllerBusy as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
