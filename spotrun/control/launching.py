"""Launching an attempt: ask the policy, try its choice and then the other candidates best-first,
fail over on capacity, quota and price errors, move the checkpoint to the target cloud's store,
and re-issue a launch a dead controller left half done (same client token: never two instances)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spotrun.clouds import remote_clouds
from spotrun.clouds.base import (
    AuthError,
    BadRequest,
    Boot,
    Instance,
    NoCapacity,
    PriceTooLow,
    ProviderError,
    QuotaExceeded,
    Throttled,
)
from spotrun.clouds.images import gpu_env
from spotrun.clouds.store import job_prefix
from spotrun.control.core import ControllerCore
from spotrun.control.decide import order_for
from spotrun.control.outcome import (
    EXIT_BAD_INPUT,
    EXIT_BUDGET,
    EXIT_NO_CAPACITY,
    JobFinished,
)
from spotrun.control.specs import store_for
from spotrun.control.state import Attempt, Job, JobStatus

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer
    from spotrun.planner import Candidate
    from spotrun.policies.base import Decision
    from spotrun.spec import JobSpec


class LaunchingMixin(ControllerCore):
    def _launch_next(self, job: Job, spec: JobSpec) -> bool | None:
        """Ask the policy what to run, then try its choice and the other candidates of the same
        market best-first until one launches. False when none had capacity; None to wait. When
        the policy's own choice finds no capacity, the policy is asked again at once, knowing it
        (what a launch attempt reveals, as in the simulator: spotrun/policies/observe.py)."""
        candidates = self._candidates(job, spec)
        if not candidates:
            raise self._nothing_fits(job, spec)
        allow_ondemand = spec.resources.spot is not True or spec.recovery.on_demand_fallback
        tried: set[tuple[str, bool]] = set()  # (offer, spot) already refused in this round: asked once each
        blocked: set[str] = set()  # "provider" or "provider/region" out of quota for this round
        for _ in range(len(candidates) + 1):
            decision = self._decide(job, spec, candidates, current=None)
            if decision.kind == "wait":
                return None
            ordered = order_for(decision, candidates, allow_ondemand=allow_ondemand) or candidates
            outcome = self._launch_first(job, spec, ordered, decision, tried, blocked)
            if outcome is not None:
                return outcome
        return False

    def _launch_first(
        self,
        job: Job,
        spec: JobSpec,
        ordered: list[Candidate],
        decision: Decision,
        tried: set[tuple[str, bool]],
        blocked: set[str],
    ) -> bool | None:
        """Try `ordered` best-first, skipping what this round already tried: True on a launch, False
        when none could start, None when the policy's chosen zone had no capacity (ask it again)."""
        self._sweep(job.id, spec, keep=None)  # never two instances at once
        for cand in ordered:
            offer = cand.offer
            if offer.provider in blocked or f"{offer.provider}/{offer.region}" in blocked:
                continue
            if (offer.key, cand.spot) in tried:
                continue
            tried.add((offer.key, cand.spot))
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
            if isinstance(outcome, NoCapacity) and cand.spot and offer.key == decision.zone:
                return None
            if isinstance(outcome, QuotaExceeded):
                scope = outcome.scope
                blocked.add(offer.provider if scope == "provider" else f"{offer.provider}/{offer.region}")
        return False

    def _nothing_fits(self, job: Job, spec: JobSpec) -> JobFinished:
        """Why nothing can be launched: a budget or deadline the estimates miss (exit 4), or no
        offer with the resources at all (exit 3)."""
        from spotrun.planner import plan

        result = plan(spec, self.offers_for(spec, job.id))
        near = result.near_misses[0] if result.near_misses else None
        if near is None:
            return JobFinished(
                JobStatus.NO_CAPACITY, EXIT_NO_CAPACITY, f"no offer fits the job: {result.explain_empty()}"
            )
        status = JobStatus.DEADLINE_EXCEEDED if not near.meets_deadline else JobStatus.BUDGET_EXHAUSTED
        return JobFinished(status, EXIT_BUDGET, f"no offer meets the budget and deadline: {result.explain_empty()}")

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
        cloud = offer.provider in remote_clouds()
        secrets_env = self._secrets_env(job, spec, attempt, offer, provider, store_url) if cloud else {}
        if secrets_env is None:
            return ProviderError("the job's secrets could not be stored")
        boot = Boot(
            job_id=job.id,
            attempt=attempt.n,
            store_url=store_url,
            job_prefix=job_prefix(job.id),
            spotrun_spec=_spotrun_requirement(offer.provider if cloud else ""),
            spotrun_package=self._agent_package(store_url) if cloud else "",
            extra=offer.provider if cloud else "",
            env={**secrets_env, **gpu_env(offer)} if cloud and spec.resources.gpu else secrets_env,
            labels=dict(spec.labels),
            spotrun_sha256=self._agent_packed.sha256 if cloud and self._agent_packed else "",
        )
        try:
            instance = self._with_retries(
                lambda: provider.launch(offer, spot=spot, boot=boot, client_token=attempt.client_token)
            )
        except AuthError as e:
            self.state.end_attempt(job.id, attempt.n, "launch_failed", self.clock.now(), detail=f"auth: {e}")
            what = "the VMs' identity" if e.code == "identity" else "credentials rejected"  # identity.py's refusal
            raise JobFinished(JobStatus.FAILED, EXIT_BAD_INPUT, f"{offer.provider}: {what}: {e}") from None
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

    def _secrets_env(
        self, job: Job, spec: JobSpec, attempt: Attempt, offer: Offer, provider: Any, store_url: str
    ) -> dict[str, str] | None:
        """The job's `${VAR}` values into the cloud's secret store (spotrun/control/secrets.py): the
        boot env holding the reference; None (attempt ended) when the store failed for now."""
        from spotrun.clouds.secrets import SecretsError
        from spotrun.control.secrets import boot_env

        try:
            return boot_env(offer.provider, provider, job.id, spec, job.spec, store_url=store_url, region=offer.region)
        except SecretsError as e:
            self.state.end_attempt(job.id, attempt.n, "launch_failed", self.clock.now(), detail=f"secrets: {e}")
            if e.permanent:
                raise JobFinished(JobStatus.FAILED, EXIT_BAD_INPUT, f"secrets: {e}") from None
            return None

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
        from spotrun.control.transfer import move_job

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
        from spotrun.agent import package as agent_package

        if self._agent_packed is None:
            self._agent_packed = agent_package.build()
        from spotrun.control.submitting import upload_verified

        packed = self._agent_packed
        key = agent_package.package_key(packed.sha256)
        upload_verified(self._store(store_url), key, packed.path, packed.size, packed.sha256, "agent")
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


def _spotrun_requirement(extra: str = "") -> str:
    """What a VM installs when it cannot fetch the Agent package from the store."""
    from spotrun import __version__

    return os.environ.get("SPOTRUN_PIP_SPEC", f"spotrun{f'[{extra}]' if extra else ''}=={__version__}")
