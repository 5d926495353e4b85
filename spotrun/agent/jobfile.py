"""`<job_prefix>/job.json`: what the Agent runs, written by the controller, read by the Agent.

Also the store keys of everything an attempt writes, so the controller and the Agent agree
on one layout (DESIGN.md "Store layout").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

JOB_FORMAT = 1


@dataclass(frozen=True)
class DataItem:
    """One data entry placed under the Agent's data folder before the workload starts.

    kind "store": `source` is a store key of a tar.gz made by `spotrun.bundle.pack_path`; a
    folder archive fills `<data>/<target>/`, a single-file archive becomes `<data>/<target>`.
    kind "url": `source` is an `s3://`, `gs://`, `az://` or `file://` URI; every object under it
    is copied to `<data>/<target>/<relative key>` (an URI naming one object becomes the file
    `<data>/<target>`).

    An absolute `target` is that path itself (in a container: a folder mounted at that path).
    """

    source: str
    target: str
    kind: Literal["store", "url"] = "store"

    def __post_init__(self) -> None:
        if self.kind not in ("store", "url"):
            raise ValueError(f"data kind must be 'store' or 'url', not {self.kind!r}")
        if not self.target or ".." in self.target.replace("\\", "/").split("/"):
            raise ValueError(f"data target must be a path without '..': {self.target!r}")


@dataclass
class AgentJob:
    job_id: str
    name: str
    run: str
    bundle: str | None = None  # store key of the code bundle tar.gz (None: empty workdir)
    setup: str | None = None
    image: str | None = None  # when set, setup+run happen in this container image
    container_cli: str | None = None  # "docker" | "podman" | a command with global flags | None: auto
    container_args: list[str] = field(default_factory=list)  # extra args for `<cli> run`
    env: dict[str, str] = field(default_factory=dict)
    # names of variables whose values must never be stored: the Agent passes them on from its
    # own environment (set by whoever started it), to a container by name only
    secret_env: list[str] = field(default_factory=list)
    data: list[DataItem] = field(default_factory=list)
    checkpoint_dir: str = "/checkpoints"  # mount point of the checkpoints inside a container
    keep: int = 3  # complete checkpoints kept in the store
    upload_budget: float = 10.0  # seconds of the notice window kept for the final upload
    heartbeat_interval: float = 5.0
    log_flush_interval: float = 2.0
    format: int = JOB_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> AgentJob:
        from spotrun.checkpoint.format import loads_bounded

        raw = loads_bounded(text, max_bytes=4 * 1024 * 1024, max_depth=16)
        if not isinstance(raw, dict):
            raise ValueError("job.json is not a JSON object")
        fmt = raw.get("format", JOB_FORMAT)
        if fmt != JOB_FORMAT:
            raise ValueError(f"job.json format {fmt} is not supported by this Agent (wants {JOB_FORMAT})")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        data = raw.get("data", [])
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise ValueError("job.json: data must be a list of objects")
        known["data"] = [DataItem(**d) for d in data]
        return cls(**known)


# --------------------------------------------------------------------------- store keys


def job_key(job_prefix: str) -> str:
    return f"{job_prefix}/job.json"


def checkpoints_prefix(job_prefix: str) -> str:
    return f"{job_prefix}/checkpoints/"


def outputs_prefix(job_prefix: str) -> str:
    return f"{job_prefix}/outputs/"


def attempt_prefix(job_prefix: str, attempt: int) -> str:
    return f"{job_prefix}/attempts/{attempt}"


def log_prefix(job_prefix: str, attempt: int) -> str:
    return f"{attempt_prefix(job_prefix, attempt)}/log/"


def log_key(job_prefix: str, attempt: int, seq: int) -> str:
    return f"{log_prefix(job_prefix, attempt)}{seq:08d}"


def heartbeat_key(job_prefix: str, attempt: int) -> str:
    return f"{attempt_prefix(job_prefix, attempt)}/heartbeat"


def exit_key(job_prefix: str, attempt: int) -> str:
    return f"{attempt_prefix(job_prefix, attempt)}/exit"
