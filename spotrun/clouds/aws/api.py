"""Calling AWS: boto3 clients, bounded retries, and AWS errors as the shared provider errors.

`AWSApi.call` runs one API call. Throttling (`RequestLimitExceeded`, `Throttling`, ...), AWS-side
5xx and transient network failures are retried with exponential backoff and full jitter (sleeping
on the injected clock), at most `max_attempts` times in all, then raised as `Throttled`; botocore's
own retries are switched off so there is one retry policy, here. Everything else is translated
at once by `translate_error`: capacity -> NoCapacity, account limits -> QuotaExceeded(region),
spot price -> PriceTooLow, credentials/permissions -> AuthError (with a message saying what to
do, never the key), the rest -> BadRequest. Messages are scrubbed of credential values.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from typing import Any

from spotrun.clock import SYSTEM_CLOCK, Clock
from spotrun.clouds.base import (
    AuthError,
    BadRequest,
    NoCapacity,
    PriceTooLow,
    ProviderError,
    QuotaExceeded,
    Throttled,
)

log = logging.getLogger(__name__)

CAPACITY_CODES = {
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "UnfulfillableCapacity",
    "InsufficientCapacity",
}
QUOTA_CODES = {"MaxSpotInstanceCountExceeded", "VcpuLimitExceeded", "InstanceLimitExceeded"}
PRICE_CODES = {"SpotMaxPriceTooLow"}
EXPIRED_CODES = {"ExpiredToken", "ExpiredTokenException", "RequestExpired"}
BAD_CREDENTIAL_CODES = {
    "AuthFailure",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "UnrecognizedClientException",
}
PERMISSION_CODES = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"}
THROTTLE_CODES = {
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
    "RequestThrottled",
    "SlowDown",
}
TRANSIENT_CODES = {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"}

_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{12,}\b")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` without anything that looks like an access key id, nor any of `secrets`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return _KEY_ID.sub("<redacted>", text)


def _error_parts(exc: Exception) -> tuple[str, str, str]:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    operation = getattr(exc, "operation_name", "") or ""
    return str(error.get("Code", "")), str(error.get("Message", "")), operation


def translate_error(exc: Exception, secrets: tuple[str, ...] = ()) -> ProviderError:
    """One boto3/botocore failure as the shared provider error the controller understands."""
    from botocore import exceptions as bx

    credential_errors = (
        bx.NoCredentialsError,
        bx.PartialCredentialsError,
        bx.CredentialRetrievalError,
        bx.TokenRetrievalError,
        bx.SSOTokenLoadError,
        bx.UnauthorizedSSOTokenError,
        bx.NoAuthTokenError,
        bx.ProfileNotFound,
    )
    if isinstance(exc, credential_errors):
        return AuthError(
            "no usable AWS credentials found: set AWS_PROFILE (after `aws configure` or `aws sso login`)"
            " or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, see docs/providers/aws.md"
            f" ({type(exc).__name__})",
            code=type(exc).__name__,
        )
    if isinstance(exc, bx.NoRegionError):
        return BadRequest("no AWS region given: set AWS_REGION or the provider's region", code="NoRegion")
    if isinstance(
        exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.ConnectionClosedError)
    ):
        return Throttled(f"AWS API not reachable: {redact(str(exc), secrets)}", code=type(exc).__name__)
    code, message, operation = _error_parts(exc)
    message = redact(message, secrets)[:400]
    where = f" ({operation})" if operation else ""
    if code in CAPACITY_CODES:
        return NoCapacity(f"no capacity{where}: {message}", code=code)
    if code in QUOTA_CODES:
        return QuotaExceeded(f"account limit reached{where}: {message}", code=code, scope="region")
    if code in PRICE_CODES:
        return PriceTooLow(f"spot price above the max price{where}: {message}", code=code)
    if code in EXPIRED_CODES:
        return AuthError(
            f"AWS credentials have expired ({code}): refresh them (`aws sso login`, or a new session"
            " token) and run again",
            code=code,
        )
    if code in BAD_CREDENTIAL_CODES:
        return AuthError(
            f"AWS rejected the credentials ({code}): check AWS_PROFILE or the access key in use ({message})",
            code=code,
        )
    if code in PERMISSION_CODES:
        return AuthError(
            f"the AWS identity is not allowed to call {operation or 'this API'} ({code}); the IAM"
            " permissions spotrun needs are listed in docs/providers/aws.md",
            code=code,
        )
    if code in THROTTLE_CODES or code in TRANSIENT_CODES:
        return Throttled(f"AWS is rate limiting or briefly unavailable{where}: {code}", code=code)
    return BadRequest(f"AWS rejected the request{where}: {code}: {message}", code=code or type(exc).__name__)


def is_aws_error(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, (BotoCoreError, ClientError))


class AWSApi:
    """A boto3 session, its clients (one per service and region), and `call` with retries."""

    def __init__(
        self,
        session: Any = None,
        *,
        region: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        max_attempts: int = 6,
        backoff_base: float = 0.5,
        backoff_cap: float = 20.0,
    ) -> None:
        self.region = region
        self.clock = clock
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._session = session
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()
        self._random = random.Random()

    @property
    def session(self) -> Any:
        with self._lock:
            if self._session is None:
                import boto3

                self._session = boto3.session.Session()
            return self._session

    def default_region(self) -> str | None:
        return self.region or self.session.region_name

    def client(self, service: str, region: str | None = None) -> Any:
        region = region or self.default_region()
        session = self.session
        with self._lock:
            key = (service, region)
            if key not in self._clients:
                from botocore.config import Config

                # one attempt per botocore call: the retries are `call`'s
                config = Config(
                    retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=5, read_timeout=60
                )
                self._clients[key] = session.client(service, region_name=region, config=config)
            return self._clients[key]

    def secrets(self) -> tuple[str, ...]:
        """The credential values in use, to scrub from messages and to keep out of user-data."""
        try:
            creds = self.session.get_credentials()
            frozen = creds.get_frozen_credentials() if creds is not None else None
        except Exception:  # noqa: BLE001 -- credentials that cannot be loaded leave nothing to hide
            return ()
        if frozen is None:
            return ()
        return tuple(v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
        return self._random.uniform(0.0, min(self.backoff_cap, self.backoff_base * (2**attempt)))

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`: throttling and transient failures retried, others translated."""
        for attempt in range(self.max_attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 -- translated below, or re-raised untouched
                if not is_aws_error(exc):
                    raise
                error = translate_error(exc, self.secrets())
            if not isinstance(error, Throttled) or attempt + 1 >= self.max_attempts:
                raise error
            delay = self.backoff(attempt)
            log.info("AWS %s, retrying in %.1fs (%d/%d)", error.code, delay, attempt + 1, self.max_attempts)
            self.clock.sleep(delay)
        raise AssertionError("unreachable")
