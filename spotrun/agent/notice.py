"""Preemption-notice watchers, one per cloud, chosen by the boot record's `notice["kind"]`.

A watcher answers one question, cheaply and often: is a preemption notice out, and how many
seconds are left? Each cloud's watcher lives in its own folder, `spotrun/clouds/<kind>/notice.py`,
declared by that folder's `NOTICE` and imported only when used:

    local  (a file the local market writes)
    aws    (IMDSv2 spot/instance-action, rebalance recommendation)
    gcp    (metadata instance/preempted)
    azure  (Scheduled Events, Preempt)

Constructor: `Watcher(**options)` with the notice dict minus "kind".
"""

from __future__ import annotations

from typing import Any, Protocol


class NoticeWatcher(Protocol):
    poll_interval: float  # seconds between checks

    def check(self) -> float | None:
        """Seconds left before the instance is taken, if a notice is out; else None."""

    def acknowledge(self) -> None:
        """Called once the checkpoint is uploaded (Azure: approve the event). May do nothing."""


def make_watcher(notice: dict[str, Any]) -> NoticeWatcher | None:
    """The watcher for a boot record's notice dict; None when it names no kind."""
    kind = notice.get("kind")
    if not kind:
        return None
    from spotrun.clouds import load_class, notice_watchers

    options = {k: v for k, v in notice.items() if k != "kind"}
    return load_class(notice_watchers()[kind])(**options)
