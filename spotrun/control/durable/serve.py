"""The controller host's program: `python -m spotrun.control.durable.serve --store URL`.

Holds the store's host lease (a second host stands down), starts a durable controller for every
queued job that no controller drives (each one rebuilds its database from the job's record and
adopts the job's instance), forgets finished jobs, and after `--idle` seconds with nothing to
drive releases the lease and deletes its own instance through the provider interface."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import time
from pathlib import Path

from spotrun.clouds.store import NotFound, Store, open_store
from spotrun.control.durable.host import HOST_JOB, HOST_KEY, INSTANCE_KEY, QUEUE, host_info
from spotrun.control.durable.lease import Holder, Lease, LeaseKeeper, lease_live, read_lease
from spotrun.control.durable.record import read_record
from spotrun.control.durable.run import spawn
from spotrun.control.state import JobStatus


def serve(store: Store, lease: Lease, *, idle: float, poll: float, home: Path) -> str:
    """Drive queued jobs until idle; return why it stopped ("idle" or "lease lost")."""
    keeper = LeaseKeeper(lease).start()  # a slow round (many jobs, a loaded host) keeps the lease
    try:
        return _serve_rounds(store, lease, keeper, idle=idle, poll=poll, home=home)
    finally:
        keeper.stop()


def _serve_rounds(
    store: Store,
    lease: Lease,
    keeper: LeaseKeeper,
    *,
    idle: float,
    poll: float,
    home: Path,
) -> str:
    children: dict[str, subprocess.Popen[bytes]] = {}
    idle_since = time.monotonic()
    while True:
        keeper.beat()
        if not lease.renew():
            return "lease lost"
        active = False
        for key in store.list(QUEUE):
            job_id = key.rsplit("/", 1)[1]
            record = read_record(store, job_id)
            if record is not None and JobStatus(record["job"]["status"]).terminal:
                store.delete(key)
                done = children.pop(job_id, None)
                if done is not None:
                    done.wait()
                    report_exit(job_id, done, home / f"controller-{job_id}.log")
                continue
            active = True
            child = children.get(job_id)
            if record is None or (child is not None and child.poll() is None):
                continue
            if child is not None:
                report_exit(job_id, child, home / f"controller-{job_id}.log")
                del children[job_id]
            if not lease_live(read_lease(store, job_id), time.time()):
                print(f"driving job {job_id}", flush=True)
                # on a cloud host, the interpreter vmboot found (it may be a wrapper around sys.executable)
                python = os.environ.get("SPOTRUN_CONTROLLER_PYTHON") or None
                children[job_id] = spawn(job_id, store.url, home / f"controller-{job_id}.log", python)
        if active or any(c.poll() is None for c in children.values()):
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= idle:
            return "idle"
        time.sleep(poll)


def report_exit(job_id: str, child: subprocess.Popen[bytes], log: Path) -> None:
    """A job's controller ended: say so, with its log's tail (a cloud host's console and boot log
    are where anyone can read what happened on it)."""
    try:
        tail = log.read_text(errors="replace").splitlines()[-20:]
    except OSError:
        tail = []
    print(f"job {job_id}: its controller exited with {child.returncode}", flush=True)
    for line in tail:
        print(f"  {line}", flush=True)


def delete_own_instance(store: Store) -> None:
    from spotrun.clouds import get_provider
    from spotrun.clouds.base import Instance

    try:
        instance = Instance.from_dict(json.loads(store.get_bytes(INSTANCE_KEY)))
    except (NotFound, ValueError):
        return
    store.delete(INSTANCE_KEY)
    get_provider(instance.provider).terminate(instance)  # the last thing it does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spotrun.control.durable.serve")
    parser.add_argument("--store", required=True)
    # a cloud host gets these two through its boot record's env (clouds/vmboot.py runs `serve`)
    parser.add_argument(
        "--holder",
        default=os.environ.get("SPOTRUN_CONTROLLER_HOLDER") or None,
        help="the lease holder id the launching CLI reserved",
    )
    parser.add_argument("--idle", type=float, default=float(os.environ.get("SPOTRUN_CONTROLLER_IDLE") or 1800.0))
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--local-root", default="", help="the local cloud this host runs in (its own jobs too)")
    args = parser.parse_args(argv)
    if args.local_root:
        os.environ["SPOTRUN_LOCAL_ROOT"] = args.local_root
    if "SPOTRUN_BOOT_B64" in os.environ:  # on its own instance: its own home, not the launcher's
        os.environ["SPOTRUN_HOME"] = str(Path.cwd() / "spotrun-home")
    from spotrun.paths import home

    store = open_store(args.store)
    holder = Holder(args.holder or os.urandom(8).hex(), socket.gethostname(), os.getpid())
    lease = Lease(store, HOST_JOB, holder=holder, key=HOST_KEY)
    info = host_info(store) or {}
    lease.extra = {k: info[k] for k in ("provider", "instance_type", "zone", "hourly_price", "started_at") if k in info}
    if not lease.acquire():
        print("another controller host serves this store; standing down", flush=True)
        return 2
    why = serve(store, lease, idle=args.idle, poll=args.poll, home=home())
    print(f"controller host stops: {why}", flush=True)
    if why == "idle":
        lease.release()
        delete_own_instance(store)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
