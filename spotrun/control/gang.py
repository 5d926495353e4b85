"""Gang launch for multi-node jobs (`resources.nodes: N`): N instances of one offer, in one zone,
started all or nothing and watched as one.

`GangProvider` wraps a cloud's Provider so the controller's loop is unchanged: one "instance" per
attempt (id `gang-<attempt>-<job>`), whose `details["gang"]` lists the N real instances in node
order.

* launch: start node 0..N-1 (client tokens `<token>-n<r>`: a re-issued launch finds them again),
  then wait until all N run. A node refused (capacity, quota, price) or not running within
  `start_timeout` seconds: every node already started is terminated before the error is raised,
  so a partial gang is never paid for longer than the bound (the launch calls plus
  `start_timeout`, plus the terminate calls).
* poll: a node preempted, terminated or failed is the gang's interruption (PREEMPTED, reason
  "gang: node r ..."); node 0's end is the gang's end (its Agent writes the attempt's record).
* terminate / drain: every node (a drain is a notice to each; the Agents also broadcast it).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from spotrun.clouds.base import (
    Boot,
    Instance,
    InstanceState,
    InstanceStatus,
    NoCapacity,
    Provider,
    ProviderError,
)

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer
    from spotrun.control.records import ExitRecord
    from spotrun.spec import JobSpec

START_TIMEOUT = 300.0  # seconds: a gang whose nodes are not all running by then is torn down
_LOST = (InstanceStatus.PREEMPTED, InstanceStatus.TERMINATED, InstanceStatus.FAILED)


def nodes_of(spec: JobSpec) -> int:
    return int(getattr(spec.resources, "nodes", 1) or 1)


def gang_of(provider: Provider, spec: JobSpec) -> Provider:
    """The provider the controller drives for this job: itself, or a gang over it."""
    n = nodes_of(spec)
    if n <= 1:
        return provider
    gpu = spec.resources.gpu
    return GangProvider(provider, n, nproc=gpu.count if gpu is not None else 1)


class GangProvider(Provider):
    def __init__(
        self,
        inner: Provider,
        nodes: int,
        *,
        nproc: int = 1,
        start_timeout: float = START_TIMEOUT,
        poll_every: float = 0.2,
    ) -> None:
        self.inner, self.nodes, self.nproc = inner, nodes, nproc
        self.name = inner.name
        self.start_timeout, self.poll_every = start_timeout, poll_every

    def __getattr__(self, name: str) -> Any:  # time_scale, market_offers, boot_timeout...
        return getattr(self.inner, name)

    # ------------------------------------------------------------------ launch

    def _node_boot(self, boot: Boot, rank: int) -> Boot:
        env = dict(boot.env)
        env.update({"SPOTRUN_NODE_RANK": str(rank), "SPOTRUN_NUM_NODES": str(self.nodes)})
        env["SPOTRUN_NPROC_PER_NODE"] = str(self.nproc)
        if self.inner.name == "local":  # every local "node" is a process tree on this machine
            env["SPOTRUN_GANG_HOST"] = "127.0.0.1"
            env["SPOTRUN_TORCHRUN_PYTHON"] = str(getattr(self.inner, "python", "") or "python")
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        return dataclasses.replace(boot, env=env)

    def launch(self, offer: Offer, *, spot: bool, boot: Boot, client_token: str) -> Instance:
        started: list[Instance] = []
        began = time.monotonic()
        place = getattr(self.inner, "gang_placement", None)  # the cloud's way to keep the nodes close
        extra = {"placement": place(offer, boot.job_id, self.nodes)} if place is not None else {}
        try:
            for rank in range(self.nodes):
                node_boot = self._node_boot(boot, rank)
                token = f"{client_token}-n{rank}"
                started.append(self.inner.launch(offer, spot=spot, boot=node_boot, client_token=token, **extra))
            self._wait_running(started, began)
        except BaseException:
            self._terminate_all(started)
            raise
        first = started[0]
        return Instance(
            provider=first.provider,
            instance_id=gang_id(boot.job_id, boot.attempt),
            region=first.region,
            zone=first.zone,
            instance_type=first.instance_type,
            spot=spot,
            job_id=boot.job_id,
            attempt=boot.attempt,
            launched_at=first.launched_at,
            details={"gang": [i.to_dict() for i in started], "nodes": self.nodes},
        )

    def _wait_running(self, members: list[Instance], began: float) -> None:
        while True:
            states = [self.inner.poll(m) for m in members]
            for rank, st in enumerate(states):
                if not st.alive:
                    raise NoCapacity(f"gang node {rank} ({members[rank].instance_id}) {st.status}: {st.reason}")
            if all(st.status == InstanceStatus.RUNNING for st in states):
                return
            if time.monotonic() - began > self.start_timeout:
                waiting = [
                    m.instance_id for m, st in zip(members, states, strict=True) if st.status != InstanceStatus.RUNNING
                ]
                raise NoCapacity(f"gang: nodes {waiting} not running within {self.start_timeout:.0f}s")
            time.sleep(self.poll_every)

    # ------------------------------------------------------------------ the running gang

    def members(self, instance: Instance) -> list[Instance]:
        listed = instance.details.get("gang")
        if not listed:
            return [instance]  # an instance of one node (e.g. listed by list_owned)
        return [Instance.from_dict(d) for d in listed]

    def poll(self, instance: Instance) -> InstanceState:
        states = [self.inner.poll(m) for m in self.members(instance)]
        for rank, st in enumerate(states):
            if st.status in _LOST:
                return InstanceState(InstanceStatus.PREEMPTED, reason=f"gang: node {rank} {st.status}: {st.reason}")
        if states[0].status == InstanceStatus.EXITED:
            return states[0]
        if any(st.status == InstanceStatus.PENDING for st in states):
            return InstanceState(InstanceStatus.PENDING)
        if all(st.status == InstanceStatus.EXITED for st in states):
            return states[0]
        return InstanceState(InstanceStatus.RUNNING)

    def terminate(self, instance: Instance) -> None:
        self._terminate_all(self.members(instance))

    def _terminate_all(self, members: list[Instance]) -> None:
        errors = []
        for m in members:
            try:
                self.inner.terminate(m)
            except ProviderError as e:
                errors.append(f"{m.instance_id}: {e}")
        if errors:
            raise ProviderError("; ".join(errors))

    def drain(self, instance: Instance, grace: float) -> None:
        for m in self.members(instance):
            self.inner.drain(m, grace)

    def console_output(self, instance: Instance) -> str:
        return self.inner.console_output(self.members(instance)[0])

    def list_owned(self, job_id: str) -> list[Instance]:
        """The job's live nodes, one gang instance per attempt (so the controller's sweep spares the
        running gang by its id and stops a stray gang whole)."""
        by_attempt: dict[int, list[Instance]] = {}
        for inst in self.inner.list_owned(job_id):
            by_attempt.setdefault(inst.attempt, []).append(inst)
        out = []
        for attempt, members in sorted(by_attempt.items()):
            first = members[0]
            out.append(
                dataclasses.replace(
                    first,
                    instance_id=gang_id(job_id, attempt),
                    details={"gang": [m.to_dict() for m in members], "nodes": len(members)},
                )
            )
        return out

    def release_job(self, job_id: str) -> None:
        self.inner.release_job(job_id)

    def check(self) -> dict[str, Any]:
        return self.inner.check()


def gang_id(job_id: str, attempt: int) -> str:
    return f"gang-{attempt}-{job_id}"


def gang_exit(exit_rec: ExitRecord | None, st: InstanceState) -> ExitRecord | None:
    """Node 0's record of a workload that failed because a peer node was lost is the gang's
    interruption (resume from the last complete checkpoint), not the workload's failure."""
    if exit_rec is None or exit_rec.preempted or exit_rec.reason == "completed":
        return exit_rec
    if st.status == InstanceStatus.PREEMPTED and st.reason.startswith("gang: node") and exit_rec.reason == "failed":
        return dataclasses.replace(exit_rec, reason="preempted")
    return exit_rec
