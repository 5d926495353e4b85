"""What every part of the controller shares: its State, clock, options, providers, stores and the
per-job memory (policies, drains); the parts (launching, watching, ending, planning, submitting)
are mixins over this core, and `spotrun.control.controller.Controller` puts them together."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spotrun.clock import SYSTEM_CLOCK, Clock
from spotrun.clouds.base import Provider
from spotrun.clouds.store import Store, open_store
from spotrun.control.outcome import Snapshot, spend
from spotrun.control.specs import provider_options
from spotrun.control.state import State
from spotrun.policies.base import Policy

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer
    from spotrun.spec import JobSpec


@dataclass
class ControllerOptions:
    poll_interval: float = 0.5
    capacity_wait: float | None = None  # real seconds to retry while nothing has capacity (None: the spec's)
    launch_retry_backoff: float = 2.0
    heartbeat_timeout: float = 300.0  # real seconds without a heartbeat before an attempt is called lost
    upload_budget: float = 3.0
    heartbeat_interval: float = 1.0
    log_flush_interval: float = 0.5
    policy_interval: float = 5.0  # real seconds between asking the policy about a running instance
    drain_grace: float = 30.0  # seconds a drained instance gets to checkpoint (as a notice)
    container_cli: str | None = None
    container_args: list[str] = field(default_factory=list)


class ControllerCore:
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
        # job id -> (attempt asked for a last checkpoint, the stop it ends with, when asked)
        self._limit_stop: dict[str, tuple[int, Any, float]] = {}
        self.submit_notes: list[str] = []  # what the last submit left out (credential files), for the CLI

    def _provider(self, name: str, spec: JobSpec) -> Provider:
        if name not in self.providers:
            from spotrun.clouds import get_provider

            self.providers[name] = get_provider(name, **provider_options(name, spec))
        from spotrun.control.gang import gang_of

        return gang_of(self.providers[name], spec)  # a multi-node job drives N instances as one

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


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    """A heartbeat as a plain dict (kept for callers outside the loop); see `records`."""
    from spotrun.control.records import read_heartbeat

    return read_heartbeat(store, key)
