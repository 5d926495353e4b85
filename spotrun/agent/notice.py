"""Preemption-notice watchers, one per cloud, chosen by the boot record's `notice["kind"]`.

A watcher answers one question, cheaply and often: is a preemption notice out, and how many
seconds are left? Each cloud's watcher lives in its own module (imported only when used):

    local  -> spotrun.agent.notice_local  (a file the local market writes)
    aws    -> spotrun.agent.notice_aws    (IMDSv2 spot/instance-action, rebalance recommendation)
    gcp    -> spotrun.agent.notice_gcp    (metadata instance/preempted)
    azure  -> spotrun.agent.notice_azure  (Scheduled Events, Preempt)

Constructor: `Watcher(**options)` with the notice dict minus "kind".
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol


class NoticeWatcher(Protocol):
    poll_interval: float  # seconds between checks

    def check(self) -> float | None:
        """Seconds left before the instance is taken, if a notice is out; else None."""

    def acknowledge(self) -> None:
        """Called once the checkpoint is uploaded (Azure: approve the event). May do nothing."""


WATCHERS: dict[str, str] = {
    "local": "spotrun.agent.notice_local:LocalNotice",
    "aws": "spotrun.agent.notice_aws:AWSNotice",
    "gcp": "spotrun.agent.notice_gcp:GCPNotice",
    "azure": "spotrun.agent.notice_azure:AzureNotice",
}


def make_watcher(notice: dict[str, Any]) -> NoticeWatcher | None:
    """The watcher for a boot record's notice dict; None when it names no kind."""
    kind = notice.get("kind")
    if not kind:
        return None
    module, _, cls = WATCHERS[kind].partition(":")
    options = {k: v for k, v in notice.items() if k != "kind"}
    return getattr(importlib.import_module(module), cls)(**options)
