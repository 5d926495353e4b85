"""GCP preemption notice: the metadata server's `instance/preempted`, polled every second.

`GET {endpoint}/computeMetadata/v1/instance/preempted` with `Metadata-Flavor: Google` answers
`FALSE` until Compute Engine decides to reclaim the Spot VM, then `TRUE`. From that moment the VM
has 30 seconds (Compute Engine sends the ACPI shutdown at the same time; the guest's shutdown
scripts and our Agent share those 30 s), so seconds left = 30 - time since we first saw TRUE.

Plain polling rather than `?wait_for_change=true`: a hanging request would need its own thread and
a reconnect policy, and a 1 s poll of a link-local server costs nothing. Only the standard library
is used (the Agent must not import google-auth for this). An unreachable metadata server counts
as "no notice"; the next poll tries again.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request

from spotrun.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://metadata.google.internal"
PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
NOTICE_SECONDS = 30.0


class GCPNotice:
    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        poll_interval: float = 1.0,
        notice_seconds: float = NOTICE_SECONDS,
        timeout: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.poll_interval = float(poll_interval)
        self.notice_seconds = float(notice_seconds)
        self.timeout = timeout
        self.clock = clock
        self._first_seen: float | None = None

    def preempted(self) -> bool:
        """One read of the metadata flag (raises OSError/URLError when it cannot be reached)."""
        request = urllib.request.Request(self.endpoint + PREEMPTED_PATH, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read().decode().strip().upper() == "TRUE"

    def check(self) -> float | None:
        if self._first_seen is None:
            try:
                if not self.preempted():
                    return None
            except (OSError, urllib.error.URLError) as exc:
                log.debug("GCE metadata server not reachable: %s", exc)
                return None
            self._first_seen = self.clock.now()  # TRUE never turns back: no need to ask again
        return max(0.0, self.notice_seconds - (self.clock.now() - self._first_seen))

    def acknowledge(self) -> None:
        """Nothing to approve on GCP: the VM goes when the 30 s are up."""
