"""Azure preemption notice: Scheduled Events (`Preempt`), polled every second.

`GET {endpoint}/metadata/scheduledevents?api-version=2020-07-01` with `Metadata: true` lists the
events planned for this VM. A Spot eviction is `EventType: "Preempt"`, announced at least 30 s
ahead; `NotBefore` (RFC 1123, e.g. "Mon, 19 Sep 2016 18:29:47 GMT") is when it may start, so
seconds left = NotBefore - now (0 once it is empty or past).

`acknowledge()` approves the event (`POST {"StartRequests": [{"EventId": ...}]}`) after the Agent
has uploaded the checkpoint: the VM is released at once instead of idling to NotBefore, and the
controller's relaunch starts sooner. Events for other VMs (availability sets list their peers'
events) are ignored when the boot record names this VM (`vm_name`).

Only the standard library is used. An unreachable endpoint counts as "no notice".
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime
from typing import Any

from spotrun.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254"
EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"


class AzureNotice:
    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        poll_interval: float = 1.0,
        vm_name: str | None = None,
        timeout: float = 2.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.poll_interval = float(poll_interval)
        self.vm_name = vm_name
        self.timeout = timeout
        self.clock = clock
        self.event_id: str | None = None  # the Preempt event seen, approved by acknowledge()
        self._not_before: float | None = None

    def _request(self, body: dict[str, Any] | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.endpoint + EVENTS_PATH,
            data=data,
            method="POST" if data is not None else "GET",
            headers={"Metadata": "true", **({"Content-Type": "application/json"} if data else {})},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()

    def _preempt_event(self, document: dict[str, Any]) -> dict[str, Any] | None:
        for event in document.get("Events") or []:
            if event.get("EventType") != "Preempt":
                continue
            resources = event.get("Resources") or []
            if self.vm_name and resources and self.vm_name not in resources:
                continue
            return event
        return None

    def check(self) -> float | None:
        if self.event_id is None:
            try:
                document = json.loads(self._request() or b"{}")
            except (OSError, urllib.error.URLError, ValueError) as exc:
                log.debug("Scheduled Events not reachable: %s", exc)
                return None
            event = self._preempt_event(document)
            if event is None:
                return None
            self.event_id = str(event.get("EventId", ""))
            self._not_before = _epoch(event.get("NotBefore") or "")
        if self._not_before is None:
            return 0.0
        return max(0.0, self._not_before - self.clock.now())

    def acknowledge(self) -> None:
        """Approve the Preempt event: the checkpoint is safe, Azure may take the VM now."""
        if not self.event_id:
            return
        try:
            self._request({"StartRequests": [{"EventId": self.event_id}]})
        except (OSError, urllib.error.URLError) as exc:  # the VM goes at NotBefore anyway
            log.warning("could not approve scheduled event %s: %s", self.event_id, exc)


def _epoch(text: str) -> float | None:
    """RFC 1123 date -> epoch seconds; None when empty or unreadable (the event has started)."""
    if not text.strip():
        return None
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None
