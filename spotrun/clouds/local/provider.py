"""The local provider: a simulated spot market whose instances are real local processes.

Each instance is a sandbox folder, `<root>/instances/<id>/`, and a detached "hypervisor"
process (`spotrun.clouds.local.host`) that boots the Agent there and takes the instance back
when the market (`spotrun.clouds.local.market`) says so: notice file first, then the kill. The
instances share nothing but the Store: the Agent gets code and checkpoints from there, as on a
cloud. Hypervisors run in their own sessions, so instances survive the controller, and any
provider object over the same root (another process, a restarted controller) sees them.

Under the root:

    .lock                      serializes launches (idempotency tokens, capacity, counters)
    tokens/<sha256(token)>     client token -> instance id
    markets/<job_id>.json      the market as this job sees it: epoch, spot launches per pool
    instances/<id>/            instance.json (what to run, the plan), state.json (what happened),
                               host.pid, control/, meta/notice.json, root/ (the Agent's), logs

Market time runs per job: its epoch is the job's first launch attempt under this root, so a
job replays its market (deterministic `preempt_after`, outages, a trace) from the start however
many jobs ran before, and a restarted controller carries on the same market. `fresh_market=True`
forgets every job's market.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotrun.clock import SYSTEM_CLOCK, Clock
from spotrun.clouds.base import (
    BadRequest,
    Boot,
    Instance,
    InstanceState,
    InstanceStatus,
    NoCapacity,
    Provider,
    ProviderError,
)
from spotrun.clouds.local.host import (
    CONFIG,
    FINAL,
    HOST_PID,
    MARKER_ENV,
    NOTICE,
    PREEMPT,
    STATE,
    TERMINATE,
    read_json,
    take_down,
    write_json_atomic,
)
from spotrun.clouds.local.market import LaunchPlan, Market, load_market, pool_key
from spotrun.pids import pid_alive

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer

LAUNCH_GRACE = 15.0  # seconds a launch may take to start its hypervisor before it counts as failed
STOP_WAIT = 5.0  # seconds terminate waits for the hypervisor to clean up before killing it


def default_root() -> Path:
    """SPOTRUN_LOCAL_ROOT, else SPOTRUN_HOME/local. The variable lets several SPOTRUN_HOMEs (several
    "machines") share one simulated cloud, as machines share a real one (the durable-controller tests)."""
    from spotrun.paths import home

    env = os.environ.get("SPOTRUN_LOCAL_ROOT")
    return Path(env) if env else home() / "local"


class LocalProvider(Provider):
    name = "local"

    @classmethod
    def options_from_spec(cls, spec: Any) -> dict[str, Any]:
        """Only the market file (`local: {market: …}`); the simulated machines have no disk setting."""
        market = spec.local.market if spec.local is not None else None
        return {"market": market} if market is not None else {}

    def __init__(
        self,
        market: str | Path | Market | None = None,
        root: str | Path | None = None,
        clock: Clock = SYSTEM_CLOCK,
        python: str = sys.executable,
        *,
        fresh_market: bool = False,
        agent_command: list[str] | None = None,
    ) -> None:
        """`market`: a market file, a built-in market's name, or None for the default market.
        `agent_command`: run this instead of the real Agent (tests, debugging); it gets the boot
        record in `SPOTRUN_BOOT_B64` and the same sandbox, env marker and notice file."""
        self.market = market if isinstance(market, Market) else load_market(market)
        self.root = (Path(root) if root is not None else default_root()).resolve()
        self.clock = clock
        self.python = python
        self.agent_command = list(agent_command) if agent_command else None
        self.time_scale = self.market.time_scale  # simulated seconds per real second
        self._hosts: dict[str, subprocess.Popen[bytes]] = {}  # hypervisors this object started
        if fresh_market:
            with self._lock():
                shutil.rmtree(self.root / "markets", ignore_errors=True)

    # ------------------------------------------------------------------ market

    def market_offers(self, job_id: str | None = None) -> list[Offer]:
        """The market's offers; with a job, spot prices as of that job's market time (traces)."""
        return self.market.offers(self.market_time(job_id) if job_id else 0.0)

    def epoch(self, job_id: str) -> float | None:
        """When this job's market started (clock seconds), or None before its first launch."""
        data = read_json(self._market_file(job_id))
        if data is None or data.get("digest") != self.market.digest:
            return None
        return float(data["epoch"])

    def market_time(self, job_id: str) -> float:
        """Real seconds since the job's market epoch (0 before its first launch)."""
        epoch = self.epoch(job_id)
        return 0.0 if epoch is None else max(0.0, self.clock.now() - epoch)

    def check(self) -> dict[str, Any]:
        detail = f"simulated market {self.market.source or '(in memory)'}: {len(self.market.pools)} pools, "
        detail += f"time x{self.time_scale:g}, instances under {self.root}"
        return {"provider": self.name, "usable": True, "detail": detail, "missing": []}

    # ------------------------------------------------------------------ launch

    def launch(self, offer: Offer, *, spot: bool, boot: Boot, client_token: str) -> Instance:
        if offer.provider != self.name:
            raise BadRequest(f"not a local offer: {offer.key}", code="local.wrong_provider")
        with self._lock():
            known = self._by_token(client_token)
            if known is not None:
                return known
            now = self.clock.now()
            market = self._job_market(boot.job_id, now)
            t = max(0.0, now - market["epoch"])
            pool = pool_key(offer.zone, offer.instance_type)
            why = self.market.unavailable(pool, t, spot=spot)
            if why is not None:
                raise NoCapacity(why, code="local.no_capacity")
            capacity = self.market.pools[pool].spec.capacity
            if capacity is not None and self._live_in_pool(pool) >= capacity:
                raise NoCapacity(f"{pool}: all {capacity} instances in use", code="local.at_capacity")
            k = int(market["launches"].get(pool, 0)) if spot else 0
            plan = self.market.schedule(pool, spot=spot, launch_index=k, t=t)
            if spot:
                market["launches"][pool] = k + 1
                write_json_atomic(self._market_file(boot.job_id), market)
            return self._start(offer, spot, boot, client_token, now, t, k, plan)

    def _start(
        self, offer: Offer, spot: bool, boot: Boot, token: str, now: float, t: float, k: int, plan: LaunchPlan
    ) -> Instance:
        instance_id = f"loc-{secrets.token_hex(6)}"
        sandbox = self.root / "instances" / instance_id
        (sandbox / "meta").mkdir(parents=True)
        (sandbox / "control").mkdir()
        own_boot = dataclasses.replace(
            boot, env=dict(boot.env), notice={"kind": "local", "path": str(sandbox / NOTICE)}
        )
        instance = Instance(
            provider=self.name,
            instance_id=instance_id,
            region=offer.region,
            zone=offer.zone,
            instance_type=offer.instance_type,
            spot=spot,
            job_id=boot.job_id,
            attempt=boot.attempt,
            launched_at=now,
            details={"sandbox": str(sandbox), "pool": pool_key(offer.zone, offer.instance_type)},
        )
        config = {
            "instance": instance.to_dict(),
            "boot": dataclasses.asdict(own_boot),
            "plan": {"boot": self.market.boot, **dataclasses.asdict(plan)},
            "market": {"source": self.market.source, "time": t, "launch_index": k},
            "launched_real": time.time(),
            "agent_command": self.agent_command,
        }
        write_json_atomic(sandbox / CONFIG, config)
        write_json_atomic(sandbox / STATE, {"status": "pending", "created": time.time()})
        write_json_atomic(self._token_file(token), {"instance_id": instance_id})
        try:
            host = self._spawn_host(sandbox)
        except OSError as e:
            write_json_atomic(sandbox / STATE, {"status": "failed", "reason": f"cannot start: {e}"})
            raise ProviderError(f"cannot start a local instance: {e}", code="local.spawn") from e
        (sandbox / HOST_PID).write_text(str(host.pid))
        self._hosts[instance_id] = host
        return instance

    def _spawn_host(self, sandbox: Path) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.pop(MARKER_ENV, None)  # launched from inside an instance (a controller host): not part of it
        package_parent = str(Path(__file__).resolve().parents[3])  # works from a source checkout too
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
        with open(sandbox / "host.log", "ab") as log:
            return subprocess.Popen(
                [self.python, "-m", "spotrun.clouds.local.host", str(sandbox)],
                cwd=sandbox,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not in the controller's process group: Ctrl-C or its death spare it
                close_fds=True,
            )

    # ------------------------------------------------------------------ poll / terminate

    def poll(self, instance: Instance) -> InstanceState:
        sandbox = self._sandbox(instance)
        state = read_json(sandbox / STATE)
        if state is None:
            return InstanceState(InstanceStatus.FAILED, reason=f"no such local instance ({sandbox} is gone)")
        if state.get("status") in FINAL:
            return _as_state(state)
        if self._host_alive(instance.instance_id, sandbox):
            return _as_state(state)
        if "host_pid" not in state and time.time() - float(state.get("created", 0)) < LAUNCH_GRACE:
            # The hypervisor has not reported in yet: a launch (here or in another process) is still
            # starting it. Its pid may not answer as ours for a moment right after the spawn.
            host = self._hosts.get(instance.instance_id)
            if host is None or host.poll() is None:
                return _as_state(state)
        state = read_json(sandbox / STATE) or state  # it may have finished as it exited
        if state.get("status") in FINAL:
            return _as_state(state)
        take_down(instance.instance_id, state.get("agent_pid"), sandbox / "root")
        shutil.rmtree(sandbox / "root", ignore_errors=True)
        reason = "the instance's hypervisor died" if (sandbox / HOST_PID).exists() else "the launch was interrupted"
        state.update(status="failed", reason=reason, ended_at=time.time())
        write_json_atomic(sandbox / STATE, state)
        return _as_state(state)

    def terminate(self, instance: Instance) -> None:
        """Stop the instance (SIGKILL to all its processes) and wait until none is left. Idempotent;
        an instance that already ended keeps its recorded end (exited, preempted)."""
        sandbox = self._sandbox(instance)
        if not (sandbox / CONFIG).exists():
            return
        (sandbox / TERMINATE).touch()  # the hypervisor looks every 50 ms (no signal: it may not be listening yet)
        pid = self._host_pid(sandbox)
        if self._host_alive(instance.instance_id, sandbox):
            end = time.monotonic() + STOP_WAIT
            while self._host_alive(instance.instance_id, sandbox) and time.monotonic() < end:
                time.sleep(0.02)
            if self._host_alive(instance.instance_id, sandbox):
                _signal(pid, signal.SIGKILL)
                while self._host_alive(instance.instance_id, sandbox) and time.monotonic() < end + STOP_WAIT:
                    time.sleep(0.02)
        state = read_json(sandbox / STATE) or {}
        survivors = take_down(instance.instance_id, state.get("agent_pid"), sandbox / "root")
        if state.get("status") not in FINAL:
            state.update(status="terminated", reason="terminated by request", ended_at=time.time())
            write_json_atomic(sandbox / STATE, state)
        shutil.rmtree(sandbox / "root", ignore_errors=True)
        if survivors:
            raise ProviderError(f"{instance.instance_id}: processes {survivors} survived SIGKILL", code="local.stuck")

    def drain(self, instance: Instance, grace: float) -> None:
        """A stop with a checkpoint: the same notice a preemption gives, `grace` seconds long."""
        self.preempt(instance, notice=grace)

    def preempt(self, instance: Instance, notice: float | None = None) -> None:
        """Take a spot instance back now (test hook): notice file first, then the kill after
        `notice` seconds (the market's notice when None; 0 kills without notice)."""
        write_json_atomic(self._sandbox(instance) / PREEMPT, {"notice": notice, "at": time.time()})

    def list_owned(self, job_id: str) -> list[Instance]:
        found = []
        for sandbox in self._sandboxes():
            config = read_json(sandbox / CONFIG)
            if config is None or config["instance"].get("job_id") != job_id:
                continue
            instance = Instance.from_dict(config["instance"])
            if self.poll(instance).alive:
                found.append(instance)
        return found

    # ------------------------------------------------------------------ helpers

    def _sandboxes(self) -> list[Path]:
        folder = self.root / "instances"
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def _sandbox(self, instance: Instance) -> Path:
        return self.root / "instances" / instance.instance_id

    def _host_pid(self, sandbox: Path) -> int | None:
        try:
            return int((sandbox / HOST_PID).read_text())
        except (OSError, ValueError):
            return None

    def _host_alive(self, instance_id: str, sandbox: Path) -> bool:
        host = self._hosts.get(instance_id)
        if host is not None and host.poll() is not None:  # reap our own child
            return False
        return pid_alive(self._host_pid(sandbox), cmd_hint=str(sandbox))

    def _live_in_pool(self, pool: str) -> int:
        count = 0
        for sandbox in self._sandboxes():
            config = read_json(sandbox / CONFIG)
            if config is not None and config["instance"]["details"].get("pool") == pool:
                if self.poll(Instance.from_dict(config["instance"])).alive:
                    count += 1
        return count

    def _token_file(self, token: str) -> Path:
        return self.root / "tokens" / (hashlib.sha256(token.encode()).hexdigest() + ".json")

    def _by_token(self, token: str) -> Instance | None:
        ref = read_json(self._token_file(token))
        if ref is None:
            return None
        config = read_json(self.root / "instances" / str(ref["instance_id"]) / CONFIG)
        return Instance.from_dict(config["instance"]) if config is not None else None

    def _market_file(self, job_id: str) -> Path:
        return self.root / "markets" / (hashlib.sha256(job_id.encode()).hexdigest()[:32] + ".json")

    def _job_market(self, job_id: str, now: float) -> dict[str, Any]:
        """This job's market state, started now if it has none (or the market file changed)."""
        path = self._market_file(job_id)
        data = read_json(path)
        if data is None or data.get("digest") != self.market.digest:
            data = {"job_id": job_id, "digest": self.market.digest, "epoch": now, "launches": {}}
            write_json_atomic(path, data)
        return data

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)  # only now: looking at offers creates nothing
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _as_state(state: dict[str, Any]) -> InstanceState:
    code = state.get("exit_code")
    return InstanceState(
        InstanceStatus(state["status"]), None if code is None else int(code), str(state.get("reason", ""))
    )


def _signal(pid: int | None, sig: int) -> None:
    if pid:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
