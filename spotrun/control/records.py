"""The one place where what an instance wrote to the store is parsed and checked before the
controller believes it: the exit record and the heartbeat (manifests are checked by
`spotrun.checkpoint.format.read_manifest`). The store is shared with code spotrun does not control
(the workload runs beside the Agent), so every field is typed here, with size and depth limits: a
record that does not parse or has the wrong types becomes a `malformed` one, never an exception
in the controller's loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from spotrun.checkpoint.format import loads_bounded
from spotrun.clouds.store import NotFound, Store, StoreError

MAX_RECORD_BYTES = 1024 * 1024
MAX_RECORD_DEPTH = 16
MAX_TEXT = 4000
EXIT_REASONS = ("completed", "failed", "preempted", "terminated", "agent-error")
# What an "agent-error" was about: the store, the code bundle or data, the Agent itself. These
# are infrastructure failures: retried with backoff, never counted as the workload failing.
# "boot": the VM came up without what the offer promised (its GPUs never showed): a boot failure.
INFRA_KINDS = ("store", "bundle", "data", "agent", "image", "boot")


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value: Any) -> str:
    return value[:MAX_TEXT] if isinstance(value, str) else ""


@dataclass(frozen=True)
class ExitRecord:
    """`attempts/<n>/exit`, as the Agent writes it once at the end of an attempt."""

    code: int | None
    reason: str  # one of EXIT_REASONS, or "malformed"
    at: float | None = None
    checkpoint_step: int | None = None
    error: str = ""
    phase: str = ""
    kind: str = ""  # for an agent-error: one of INFRA_KINDS

    @property
    def preempted(self) -> bool:
        return self.reason in ("preempted", "terminated")

    @property
    def infrastructure(self) -> bool:
        """The Agent, the store or the bundle failed: not the user's code."""
        return self.reason in ("agent-error", "malformed")

    @classmethod
    def parse(cls, data: bytes) -> ExitRecord:
        try:
            raw = loads_bounded(data, max_bytes=MAX_RECORD_BYTES, max_depth=MAX_RECORD_DEPTH)
        except ValueError as e:
            return cls(None, "malformed", error=f"exit record is not valid JSON: {e}")
        if not isinstance(raw, dict):
            return cls(None, "malformed", error=f"exit record is a {type(raw).__name__}, not an object")
        reason = raw.get("reason")
        code = raw.get("code")
        if reason not in EXIT_REASONS or (code is not None and _int(code) is None):
            shown = repr({k: raw.get(k) for k in ("code", "reason")})[:200]
            return cls(None, "malformed", error=f"exit record has unexpected fields: {shown}")
        kind = _text(raw.get("kind"))
        return cls(
            code=_int(code),
            reason=reason,
            at=_float(raw.get("at")),
            checkpoint_step=_int(raw.get("checkpoint_step")),
            error=_text(raw.get("error")),
            phase=_text(raw.get("phase"))[:40],
            kind=kind if kind in INFRA_KINDS else ("agent" if reason == "agent-error" else ""),
        )


@dataclass(frozen=True)
class Heartbeat:
    """`attempts/<n>/heartbeat`, rewritten by the Agent every few seconds."""

    at: float | None
    phase: str = ""
    checkpoint_step: int | None = None
    progress: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes) -> Heartbeat | None:
        try:
            raw = loads_bounded(data, max_bytes=MAX_RECORD_BYTES, max_depth=MAX_RECORD_DEPTH)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        progress = raw.get("progress")
        clean: dict[str, Any] = {}
        if isinstance(progress, dict):  # the workload writes it: keep plain finite numbers only
            for key in ("step", "total", "at"):
                value = _float(progress.get(key))
                if value is not None:
                    clean[key] = int(value) if key != "at" and value.is_integer() else value
        return cls(
            at=_float(raw.get("at")),
            phase=_text(raw.get("phase"))[:40],
            checkpoint_step=_int(raw.get("checkpoint_step")),
            progress=clean,
        )

    def to_dict(self) -> dict[str, Any]:
        """The shape views and the policy read (the Agent's own JSON, cleaned)."""
        return {
            "at": self.at,
            "phase": self.phase,
            "checkpoint_step": self.checkpoint_step,
            "progress": dict(self.progress) or None,
        }


def read_record(store: Store, key: str) -> bytes | None:
    """The raw bytes of a record, or None when missing or the store is flaky right now."""
    try:
        return store.get_bytes(key)
    except NotFound:
        return None
    except (StoreError, OSError):  # a transient store error: try again at the next poll
        return None


def read_exit(store: Store, key: str) -> ExitRecord | None:
    data = read_record(store, key)
    return None if data is None else ExitRecord.parse(data)


def read_heartbeat(store: Store, key: str) -> dict[str, Any] | None:
    data = read_record(store, key)
    beat = None if data is None else Heartbeat.parse(data)
    return None if beat is None else beat.to_dict()
