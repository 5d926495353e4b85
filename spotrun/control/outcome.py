"""What a controller run ends with, and what it reports on the way: exit codes (README's contract),
the job's result, the live snapshot, and the spend-so-far arithmetic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spotrun.control.state import Attempt, Job, JobStatus

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


FINISH_TERMINATE_TRIES = 5


INFRA_RETRIES = 3  # attempts in a row the Agent may fail on the store/bundle/itself before the job fails


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
    launch_failures: int = 0  # launches refused (no capacity, quota, price): each one attempt row

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "exit_code": self.exit_code,
            "job_exit_code": self.job_exit_code,
            "reason": self.reason,
            "attempts": self.attempts,
            "launch_failures": self.launch_failures,
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
