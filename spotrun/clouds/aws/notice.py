"""AWS preemption notice: the instance metadata service (IMDSv2), polled every few seconds.

Two signals, both read with a session token (IMDSv2: `PUT /latest/api/token`, then the token in
the `X-aws-ec2-metadata-token` header; spotrun launches instances with IMDSv1 disabled):

* `latest/meta-data/spot/instance-action`: 404 while nothing is planned; once EC2 has decided to
  take the instance back it answers `{"action": "terminate"|"stop"|"hibernate", "time": "...Z"}`,
  about two minutes ahead. Seconds left = that time minus now (never below zero).
* `latest/meta-data/events/recommendations/rebalance`: `{"noticeTime": "...Z"}` when EC2 sees an
  elevated risk of interruption, usually well before any instance-action (or without one ever
  following). spotrun treats it as an early warning: it reports a notice with a generous
  `rebalance_seconds` left (default 300 s), so the Agent checkpoints and hands the job over while
  there is no hurry, instead of racing the two-minute notice later.

Only the standard library is used (urllib): the Agent must not pay boto3's import time for this.
A metadata service that cannot be reached counts as "no notice" (the next poll tries again).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from datetime import datetime

from spotrun.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"


def _epoch(text: str) -> float:
    """'2024-05-01T12:00:00Z' -> epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class AWSNotice:
    """Spot instance-action and rebalance recommendation, from IMDSv2."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        poll_interval: float = 2.0,
        token_ttl: int = 21600,
        rebalance_seconds: float = 300.0,
        timeout: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        # AWS_EC2_METADATA_SERVICE_ENDPOINT is the SDKs' own override of the IMDS address (boto3
        # and the CLI honor it); the watcher follows it like the VM's other IMDS clients do
        if endpoint == DEFAULT_ENDPOINT and os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"):
            endpoint = os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"]
        self.endpoint = endpoint.rstrip("/")
        self.poll_interval = poll_interval
        self.token_ttl = int(token_ttl)
        self.rebalance_seconds = rebalance_seconds
        self.timeout = timeout
        self.clock = clock
        self._token: str | None = None
        self._token_expires = 0.0
        self._warned = False

    # ------------------------------------------------------------------ IMDSv2

    def _token_value(self) -> str:
        now = self.clock.now()
        if self._token is None or now >= self._token_expires:
            request = urllib.request.Request(
                self.endpoint + TOKEN_PATH, method="PUT", headers={TOKEN_TTL_HEADER: str(self.token_ttl)}
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                self._token = response.read().decode().strip()
            # renew a minute early (or halfway, for short TTLs) so a token never expires in flight
            self._token_expires = now + max(1.0, min(self.token_ttl - 60, self.token_ttl / 2))
        return self._token

    def _get(self, path: str) -> str | None:
        """The body at `path`, or None on 404. Renews the token once if IMDS says 401."""
        for attempt in range(2):
            request = urllib.request.Request(self.endpoint + path, headers={TOKEN_HEADER: self._token_value()})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read().decode()
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code == 401 and attempt == 0:
                    self._token = None
                    continue
                raise
        return None

    # ------------------------------------------------------------------ NoticeWatcher

    def check(self) -> float | None:
        try:
            action = self._get(ACTION_PATH)
            rebalance = self._get(REBALANCE_PATH)
        except OSError as exc:  # IMDS unreachable (URLError, HTTPError, timeout): no news is no notice
            if not self._warned:
                log.warning("instance metadata at %s not readable (%s): no spot notice until it is", self.endpoint, exc)
                self._warned = True
            return None
        left: list[float] = []
        if action:
            try:
                left.append(max(0.0, _epoch(json.loads(action)["time"]) - self.clock.now()))
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable spot instance-action %r: treating it as immediate", action)
                left.append(0.0)
        if rebalance:
            left.append(self.rebalance_seconds)
        return min(left) if left else None

    def acknowledge(self) -> None:
        """Nothing to approve on AWS: the instance goes at the announced time either way."""
