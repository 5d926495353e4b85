"""The Agent's side of a multi-node job (`resources.nodes: N`): one Agent per node, all sharing
only the Store. Everything the nodes agree on lives under the attempt's prefix:

    attempts/<n>/gang/endpoint             node 0's rendezvous address {"host", "port"}: the other
                                           nodes wait for it, then run torchrun with c10d rendezvous
    attempts/<n>/gang/notice               the first node that gets a notice (or is stopped) writes
                                           it; every Agent polls it and stops as on its own notice
    checkpoints/<step>/parts/node-<r>.json node r's part of a sharded checkpoint, written after its
                                           files; node 0 writes the step's MANIFEST.json (all parts)
                                           only once every part is in: a partial one is never loaded
    nodes/<r>/attempts/<n>/...             node r>0's own log, heartbeat and exit record (node 0 uses
                                           the attempt's usual keys: the controller reads those)

Python 3.9, stdlib only: this runs on the VM.
"""

from __future__ import annotations

import json
import shlex
import socket
import time
from collections.abc import Callable
from pathlib import Path

from spotrun.agent import jobfile
from spotrun.agent.sync import CheckpointUploader, step_name, store_checkpoints
from spotrun.checkpoint.format import FORMAT_VERSION, MANIFEST_NAME, loads_bounded
from spotrun.clouds.store import NotFound, Store

NODE_RANK, NUM_NODES = "SPOTRUN_NODE_RANK", "SPOTRUN_NUM_NODES"
NPROC, HOST, PORT = "SPOTRUN_NPROC_PER_NODE", "SPOTRUN_GANG_HOST", "SPOTRUN_GANG_PORT"
ENDPOINT_WAIT = 300.0  # seconds a node waits for node 0's rendezvous address
PARTS_WAIT = 120.0  # seconds node 0 waits for the other nodes' parts of a checkpoint


class GangError(Exception):
    pass


def private_address() -> str:
    """This machine's private IPv4 address (the one its default route uses); no packet is sent."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))
        return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host != "0.0.0.0" else "", 0))
        return int(s.getsockname()[1])


class Gang:
    def __init__(self, store: Store, job_prefix: str, job_id: str, attempt: int, env: dict[str, str]) -> None:
        self.store, self.job_prefix, self.job_id, self.attempt = store, job_prefix, job_id, attempt
        self.rank = int(env[NODE_RANK])
        self.nodes = int(env[NUM_NODES])
        self.nproc = int(env.get(NPROC) or 1)
        self.host_hint = env.get(HOST, "")  # the local provider: 127.0.0.1 for every node
        self.port_hint = int(env.get(PORT) or 0)
        self.python = env.get("SPOTRUN_TORCHRUN_PYTHON") or "python"  # local nodes: the controller's python
        self.base = f"{jobfile.attempt_prefix(job_prefix, attempt)}/gang"
        self._notice_checked = 0.0
        self._notice: tuple[float, str] | None = None

    @classmethod
    def from_env(cls, store: Store, job_prefix: str, job_id: str, attempt: int, env: dict[str, str]) -> Gang | None:
        if int(env.get(NUM_NODES) or 1) <= 1:
            return None
        return cls(store, job_prefix, job_id, attempt, env)

    @property
    def own_prefix(self) -> str:
        """Where this node's log, heartbeat and exit record go (node 0: the job's own keys)."""
        return self.job_prefix if self.rank == 0 else f"{self.job_prefix}/nodes/{self.rank}"

    # ------------------------------------------------------------ rendezvous

    def endpoint(self, check_notice: Callable[[], None], sleep: Callable[[float], None] = time.sleep) -> str:
        """host:port of the c10d rendezvous: node 0 picks and publishes it, the others wait for it."""
        key = f"{self.base}/endpoint"
        if self.rank == 0:
            host = self.host_hint or private_address()
            port = self.port_hint or free_port(host)
            self.store.put_bytes(key, json.dumps({"host": host, "port": port}).encode())
            return f"{host}:{port}"
        end = time.monotonic() + ENDPOINT_WAIT
        while time.monotonic() < end:
            try:
                found = loads_bounded(self.store.get_bytes(key), max_bytes=4096)
            except NotFound:
                check_notice()
                sleep(0.2)
                continue
            if isinstance(found, dict) and isinstance(found.get("host"), str) and isinstance(found.get("port"), int):
                return f"{found['host']}:{found['port']}"
            raise GangError(f"{key} is malformed")
        raise GangError(f"node 0 did not publish its rendezvous address within {ENDPOINT_WAIT:.0f}s")

    def torchrun(self, endpoint: str, *, in_container: bool = False) -> str:
        """The torchrun command line: module form on the VM (works where only `python` is on PATH);
        in a container the image's own `torchrun` (the VM's interpreter path means nothing there)."""
        launcher = ["torchrun"] if in_container else [self.python, "-m", "torch.distributed.run"]
        args = [
            *launcher,
            "--nnodes", str(self.nodes), "--nproc-per-node", str(self.nproc),
            "--node-rank", str(self.rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", f"{self.job_id}-{self.attempt}", "--rdzv-conf", f"is_host={int(self.rank == 0)}",
        ]  # fmt: skip
        return " ".join(shlex.quote(a) for a in args)

    def env(self, endpoint: str, *, in_container: bool = False) -> dict[str, str]:
        host, _, port = endpoint.rpartition(":")
        return {
            NODE_RANK: str(self.rank),
            NUM_NODES: str(self.nodes),
            NPROC: str(self.nproc),
            "SPOTRUN_RDZV_ENDPOINT": endpoint,
            "SPOTRUN_TORCHRUN": self.torchrun(endpoint, in_container=in_container),
            "MASTER_ADDR": host,
            "MASTER_PORT": port,
        }

    @staticmethod
    def container_args(extra_args: list[str]) -> list[str]:
        """A gang's container shares the VM's network (`--network host`): node 0's rendezvous port
        and the collective's connections are on the VM's own address, which the other nodes were
        given. Unless the job chose a network itself (`container_args`)."""
        chosen = any(a in ("--network", "--net") or a.startswith(("--network=", "--net=")) for a in extra_args)
        return [] if chosen else ["--network", "host"]

    @staticmethod
    def command(run: str) -> str:
        """A `run` that starts with `torchrun` gets the rendezvous flags (`$SPOTRUN_TORCHRUN`)."""
        stripped = run.lstrip()
        if stripped == "torchrun" or stripped.startswith(("torchrun ", "torchrun\t", "torchrun\n")):
            return "$SPOTRUN_TORCHRUN" + stripped[len("torchrun") :]
        return run

    # ------------------------------------------------------------ notices

    def post_notice(self, seconds_left: float, reason: str) -> None:
        """Tell every node to checkpoint and stop (the first node's notice wins)."""
        body = {"node": self.rank, "seconds_left": seconds_left, "reason": reason, "at": time.time()}
        self.store.put_bytes(f"{self.base}/notice", json.dumps(body).encode(), if_absent=True)

    def read_notice(self, interval: float = 0.5) -> tuple[float, str] | None:
        """A notice another node posted: (seconds left now, reason); polled at most every `interval`."""
        if self._notice is not None:
            return self._notice
        now = time.monotonic()
        if now - self._notice_checked < interval:
            return None
        self._notice_checked = now
        try:
            found = loads_bounded(self.store.get_bytes(f"{self.base}/notice"), max_bytes=4096)
        except NotFound:
            return None
        if not isinstance(found, dict) or found.get("node") == self.rank:
            return None
        left = float(found.get("seconds_left") or 0.0) - max(0.0, time.time() - float(found.get("at") or 0.0))
        self._notice = (max(1.0, left), "preempted")
        return self._notice


class GangUploader(CheckpointUploader):
    """Uploads this node's part of each sharded checkpoint. Node 0 also commits, after each sync,
    every step whose parts are all in (the union of the parts' file lists as the MANIFEST); in the
    final sync (after a notice) it waits, bounded, for the other nodes' parts of its newest step.

    Nodes upload their newest local step and skip older ones, so a step some node skipped is never
    committed: the next one all nodes reach is."""

    def __init__(self, gang: Gang, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gang = gang
        self.committed_step: int | None = None

    def sync_once(self, *, final: bool = False) -> int | None:
        step = super().sync_once(final=final)
        if self.gang.rank == 0:
            self.commit_ready(wait_for=self.uploaded_step if final else None)
        return step

    def _upload(self, step: int, path: Path) -> bool:
        base = f"{jobfile.checkpoints_prefix(self.job_prefix)}{step_name(step)}/"
        local = (path / MANIFEST_NAME).read_bytes()
        try:
            if self.store.get_bytes(base + MANIFEST_NAME) == local:
                return True  # the committed checkpoint this node restored
        except NotFound:
            pass
        manifest = loads_bounded(local)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"local checkpoint {step} has a malformed manifest")
        for rel in sorted(manifest["files"]):
            if self._abort.is_set():
                return False
            if "/" in rel or rel in ("", ".", "..", MANIFEST_NAME):
                raise ValueError(f"bad file name in manifest: {rel!r}")
            self.store.put_file(base + rel, path / rel)
        self.store.put_bytes(f"{base}parts/node-{self.gang.rank}.json", local)
        return True

    def commit_ready(self, wait_for: int | None = None) -> int | None:
        """Commit every step all nodes' parts are in for; with `wait_for`, first wait (at most
        PARTS_WAIT) until that step's parts are all in. The newest step committed, or None."""
        parts = {f"parts/node-{r}.json" for r in range(self.gang.nodes)}
        end = time.monotonic() + PARTS_WAIT
        while True:
            found = store_checkpoints(self.store, self.job_prefix)
            if wait_for is None or wait_for not in found or parts <= found[wait_for] or time.monotonic() > end:
                break
            if MANIFEST_NAME in found[wait_for]:
                break
            time.sleep(0.2)
        if wait_for is not None and wait_for in found and not parts <= found[wait_for]:
            self.note(f"checkpoint {wait_for}: not every node's part arrived in {PARTS_WAIT:.0f}s: not committed")
        newest = None
        for step in sorted(found):
            rels = found[step]
            if MANIFEST_NAME in rels or not parts <= rels:
                continue
            if self._commit(step):
                newest = step
        if newest is not None:
            self.committed_step = newest
        return newest

    def _commit(self, step: int) -> bool:
        base = f"{jobfile.checkpoints_prefix(self.job_prefix)}{step_name(step)}/"
        files: dict[str, object] = {}
        for r in range(self.gang.nodes):
            try:
                part = loads_bounded(self.store.get_bytes(f"{base}parts/node-{r}.json"))
            except (NotFound, ValueError):
                part = None
            if not isinstance(part, dict) or not isinstance(part.get("files"), dict) or part.get("step") != step:
                self.note(f"checkpoint {step}: node {r}'s part is malformed: not committed")
                return False
            files.update(part["files"])
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "created": time.time(),
            "files": dict(sorted(files.items())),
        }
        self.store.put_bytes(base + MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        self.note(f"checkpoint {step}: all {self.gang.nodes} nodes' parts in, committed")
        return True
