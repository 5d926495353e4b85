"""The one small interface every provider (local, aws, gcp, azure) implements.

A provider knows how to start an instance that boots the spotrun Agent, how to see what
became of it, how to stop it, and how to find every instance it started for a job (so the
controller can always clean up leaks). Everything else -- planning, retries, failover,
checkpoints -- lives outside, so the controller never needs to know which cloud it talks to.
"""

from __future__ import annotations

import base64
import json
import shlex
import zlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer


# --------------------------------------------------------------------------- errors


class ProviderError(Exception):
    """Base of the shared errors. `code` keeps the cloud's own error code for the event log."""

    retryable: bool = False

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class NoCapacity(ProviderError):
    """The zone/region has no capacity for this type now: try the next candidate."""


class QuotaExceeded(ProviderError):
    """An account limit. `scope` says how far it blocks: "zone", "region" or "provider"."""

    def __init__(self, message: str, *, code: str = "", scope: str = "region") -> None:
        super().__init__(message, code=code)
        self.scope = scope


class PriceTooLow(ProviderError):
    """The spot price is above the max price the spec allows: try the next candidate."""


class AuthError(ProviderError):
    """Credentials missing, wrong or expired: stop, nothing else will work."""


class BadRequest(ProviderError):
    """The cloud rejected the request itself (bad image, bad type): skip this offer."""


class Throttled(ProviderError):
    """Rate limited: retry the same call with backoff."""

    retryable = True


# --------------------------------------------------------------------------- instances


class InstanceStatus(str, Enum):  # noqa: UP042 -- StrEnum is 3.11+
    """A string enum (`enum.StrEnum` is 3.11+; this module also runs on a VM's Python 3.9)."""

    __str__ = str.__str__
    __format__ = str.__format__

    PENDING = "pending"
    RUNNING = "running"
    PREEMPTED = "preempted"  # taken back by the cloud (spot interruption)
    EXITED = "exited"  # the Agent finished: exit_code says how the workload ended
    TERMINATED = "terminated"  # stopped by us (or by someone) without a recorded exit
    FAILED = "failed"  # never came up / broke: reason says why


@dataclass(frozen=True)
class InstanceState:
    status: InstanceStatus
    exit_code: int | None = None
    reason: str = ""

    @property
    def alive(self) -> bool:
        return self.status in (InstanceStatus.PENDING, InstanceStatus.RUNNING)


@dataclass
class Instance:
    provider: str
    instance_id: str
    region: str
    zone: str
    instance_type: str
    spot: bool
    job_id: str
    attempt: int
    launched_at: float
    details: dict[str, Any] = field(default_factory=dict)  # provider-specific, JSON-serializable

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Instance:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# --------------------------------------------------------------------------- boot


@dataclass
class Boot:
    """What an instance needs to start the Agent. Small: user-data is limited (16 KB on AWS).

    The job itself (commands, env, data, checkpoint settings) is in the Store at
    `<job_prefix>/job.json`; the Agent reads it from there. No cloud secret is ever put here:
    instances get their rights from an instance profile / service account / managed identity.
    """

    job_id: str
    attempt: int
    store_url: str  # file:///abs/path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix
    job_prefix: str  # "jobs/<job_id>" inside the store
    notice: dict[str, Any] = field(default_factory=dict)  # {"kind": "local"|"aws"|"gcp"|"azure", ...}
    env: dict[str, str] = field(default_factory=dict)  # extra non-secret env for the Agent
    spotrun_spec: str = ""  # pip requirement to install spotrun on a fresh VM, e.g. "spotrun[aws]==0.1.0"
    spotrun_package: str = ""  # store URL of the Agent package (spotrun/agent/package.py), tried first
    extra: str = ""  # the pip extra the VM needs for its cloud's store: "aws", "gcp" or "azure"
    labels: dict[str, str] = field(default_factory=dict)  # the spec's `labels:`, put on the cloud resources
    spotrun_sha256: str = ""  # of the Agent package: the VM refuses a package that does not match
    # "" boots the Agent; "controller" boots the controller host of `controller: cloud` instead
    # (control/durable/host.py): spotrun's control plane on the image's Python >= 3.11
    role: str = ""

    def to_b64(self) -> str:
        return base64.b64encode(json.dumps(asdict(self), sort_keys=True).encode()).decode()

    @classmethod
    def from_b64(cls, text: str) -> Boot:
        return cls(**json.loads(base64.b64decode(text)))


BOOT_MARKER = "SPOTRUN_BOOT_B64="


def render_bootstrap_script(boot: Boot) -> str:
    """The cloud-init / startup script, run as root by the image's own shell and `python3` (>= 3.9).

    It carries the boot record and the program `spotrun/clouds/vmboot.py` (compressed: AWS allows
    16 KB of user-data), which fetches the Agent package from the store with the VM's own identity,
    checks its sha256, installs it, ships the boot log to the store when the boot fails, and runs
    the Agent. Shared by every cloud provider; the instance emulators in tests run it unmodified.
    """
    program = base64.b64encode(zlib.compress(_vmboot_source(), 9)).decode()
    return "\n".join(
        [
            "#!/bin/bash",
            "# spotrun bootstrap: installs the Agent and starts it. Contains no credentials.",
            "# Whatever happens (a failed install included), the VM powers off when this script ends, so",
            "# it stops billing even before the controller's sweep (AWS and GCP instances are launched to",
            "# be deleted on shutdown; an Azure VM stops billing only once the controller deletes it).",
            "trap 'shutdown -h now 2>/dev/null || poweroff 2>/dev/null || true' EXIT",
            f"export {BOOT_MARKER}{boot.to_b64()}",
            *(f"export {k}={shlex.quote(v)}" for k, v in sorted(boot.env.items())),
            "if ! command -v python3 >/dev/null; then",
            '  echo "[spotrun-boot] BOOT FAILED: this image has no python3 (the Agent needs 3.9 or newer)"',
            "  exit 1",
            "fi",
            "# the program is spotrun/clouds/vmboot.py of the controller's spotrun, zlib + base64",
            'python3 -c \'import base64, sys, zlib; sys.argv[0] = "vmboot"; '
            f'exec(compile(zlib.decompress(base64.b64decode("{program}")), "vmboot", "exec"))\'',
            "",
        ]
    )


def _vmboot_source() -> bytes:
    from pathlib import Path

    return (Path(__file__).parent / "vmboot.py").read_bytes()


def extract_boot(script: str) -> Boot:
    for line in script.splitlines():
        line = line.strip()
        if line.startswith("export " + BOOT_MARKER):
            return Boot.from_b64(line[len("export " + BOOT_MARKER) :])
    raise ValueError("no spotrun boot record in this script")


# --------------------------------------------------------------------------- provider


class Provider(ABC):
    """One cloud (or the local simulated market)."""

    name: str
    takes_max_price: bool = False  # its constructor takes `max_price` (the spec's resources.max_price)
    # seconds from "the cloud reports the VM running" to the Agent's first heartbeat before the boot
    # counts as failed (`recovery.boot_timeout` overrides it); None: the controller's default
    boot_timeout: float | None = None

    @classmethod
    def options_from_spec(cls, spec: Any) -> dict[str, Any]:
        """Constructor options from a job spec (`spotrun.spec.JobSpec`): its section named after this
        cloud (less `store`, which the controller routes itself), the disk size and, for clouds that
        take one, the max spot price. Clouds with other needs override this."""
        section = getattr(spec, cls.name, None)
        fields = section.model_dump(exclude={"store"}) if section is not None else {}
        options = {k: v for k, v in fields.items() if v is not None}
        if spec.resources.disk:
            options.setdefault("disk_gb", spec.resources.disk)
        if cls.takes_max_price and spec.resources.max_price is not None:
            options.setdefault("max_price", spec.resources.max_price)
        return options

    @abstractmethod
    def launch(self, offer: Offer, *, spot: bool, boot: Boot, client_token: str) -> Instance:
        """Start one instance for `offer` that boots the Agent with `boot`.

        Idempotent on `client_token`: calling it again with the same token never starts a
        second instance. Raises one of the shared errors above on failure, and leaves nothing
        running when it raises.
        """

    @abstractmethod
    def poll(self, instance: Instance) -> InstanceState:
        """What the instance is doing now (cheap; called about once a second)."""

    @abstractmethod
    def terminate(self, instance: Instance) -> None:
        """Stop the instance and release what it holds. Idempotent."""

    @abstractmethod
    def list_owned(self, job_id: str) -> list[Instance]:
        """Every live (not terminated) instance this provider started for `job_id`."""

    def drain(self, instance: Instance, grace: float) -> None:
        """Ask the instance to stop, giving its Agent `grace` seconds to checkpoint (as on a
        preemption notice). Default: terminate, whose OS shutdown sends the Agent SIGTERM."""
        self.terminate(instance)

    def console_output(self, instance: Instance) -> str:
        """The instance's console (serial port) output, where a failed boot leaves its log when it
        could not write to the store; "" where the cloud keeps none."""
        return ""

    def release_job(self, job_id: str) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Delete what the provider created for this job only (e.g. an IAM role), once it ended."""

    def check(self) -> dict[str, Any]:
        """Is this provider usable (credentials, region, what its VMs need)? Never launches anything.
        Returns {"provider", "usable", "detail", "missing": [what to create or set, ...]};
        `usable` is False whenever `missing` is not empty."""
        return {"provider": self.name, "usable": True, "detail": "", "missing": []}
