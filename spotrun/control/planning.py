"""What the controller can run next: the offers of the spec's providers, ranked by the planner as
of the job's progress, spend and elapsed time, with zones in cooldown tried last."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from spotrun.clouds import remote_clouds
from spotrun.clouds.store import job_prefix
from spotrun.control.core import ControllerCore
from spotrun.control.outcome import (
    spend,
)
from spotrun.control.records import read_heartbeat
from spotrun.control.specs import allowed_providers
from spotrun.control.state import Attempt, Job

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer
    from spotrun.planner import Candidate
    from spotrun.spec import JobSpec


def runtime_known(spec: JobSpec) -> bool:
    """Whether the spec says how long the job runs (workload.hours or hours_on); without it every
    expected cost is a guess, and a budget or deadline is enforced as the job runs, not at planning."""
    workload = spec.workload
    return workload is not None and (workload.hours is not None or bool(workload.hours_on))


class PlanningMixin(ControllerCore):
    def _candidates(self, job: Job, spec: JobSpec) -> list[Candidate]:
        offers = self.offers_for(spec, job.id)
        attempts = self.state.attempts(job.id)
        now = self.clock.now()
        cooling = self._cooling_keys(spec, attempts, now)
        spent, _ = spend(attempts, now)
        progress = self._progress(job, attempts)
        elapsed_h = self._elapsed_job_seconds(job, attempts, now) / 3600.0
        # On a relaunch, or when the spec gives no runtime (the estimate is a guess), offers that look
        # over budget or past the deadline are still tried: the limits are enforced as the job runs.
        relaunch = bool(attempts) or not runtime_known(spec)
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
        hb = read_heartbeat(
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
        clouds = [n for n in names if n in remote_clouds()]
        if clouds and self._cloud_offers is None:
            from spotrun.catalog import load_offers

            self._cloud_offers = load_offers(clouds)
        offers = list(self._cloud_offers or [])
        if "local" in names:
            offers += self._provider("local", spec).market_offers(job_id)  # type: ignore[attr-defined]
        return offers

    def _offer_by_key(self, spec: JobSpec, key: str, job_id: str) -> Offer | None:
        return next((o for o in self.offers_for(spec, job_id) if o.key == key), None)
