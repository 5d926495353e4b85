"""`controller: cloud`: one small on-demand host per store runs the controllers of every detached
job, so nothing depends on the machine that launched them.

    controller/host.json        the host's lease (holder, expiry) with its offer and price
    controller/instance.json    the instance the host runs on (for its cost and its self-deletion)
    controller/jobs/<job_id>    a job the host must drive (written by `launch --detach`)

`ensure_host` is called by `launch --detach`: it queues the job and, when no host holds the lease,
takes the lease itself (so two launches at once start one host) and launches the cheapest on-demand
offer through the ordinary Provider interface. The host (`serve.py`) renews that lease, starts a
durable controller for each queued job nobody drives, and deletes its own instance once no job has
been active for `idle` seconds.

Implemented for the local provider (whose instances can run any command): on a real cloud the
instance's boot program would start `python -m spotrun.control.durable.serve` instead of the
Agent, which vmboot does not do yet.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

from spotrun.clouds.store import NotFound, Store
from spotrun.control.durable.lease import Holder, Lease, lease_live

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer
    from spotrun.clouds.base import Provider

HOST_KEY = "controller/host.json"
INSTANCE_KEY = "controller/instance.json"
QUEUE = "controller/jobs/"
HOST_JOB = "spotrun-controller"  # the job id the host's instance is launched under
BOOT_GRACE = 120.0  # seconds the launching CLI holds the host lease while the host boots
DEFAULT_IDLE = 1800.0  # seconds without an active job before the host deletes itself


def host_info(store: Store) -> dict[str, Any] | None:
    try:
        info = json.loads(store.get_bytes(HOST_KEY))
    except (NotFound, ValueError):
        return None
    try:
        info["instance"] = json.loads(store.get_bytes(INSTANCE_KEY))
    except (NotFound, ValueError):
        info["instance"] = None
    return dict(info)


def host_cost(info: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """What the host costs: its price per hour, per month always on, and so far."""
    if not info or not info.get("hourly_price"):
        return None
    price = float(info["hourly_price"])
    since = float(info.get("started_at") or now)
    return {
        "instance_type": info.get("instance_type"),
        "provider": info.get("provider"),
        "hourly_usd": price,
        "monthly_usd_if_always_on": round(price * 730, 2),
        "up_hours": round(max(0.0, now - since) / 3600, 4),
        "spent_usd": round(max(0.0, now - since) / 3600 * price, 6),
        "alive": lease_live(info, now),
    }


def pick_offer(offers: list[Offer]) -> Offer:
    """The cheapest on-demand offer, machines without a GPU first (a controller needs none)."""
    usable = [o for o in offers if o.ondemand_price is not None]
    if not usable:
        raise ValueError("no on-demand offer for the controller host")
    return min(usable, key=lambda o: (o.gpu_count > 0, float(o.ondemand_price or 0.0)))


def enqueue(store: Store, job_id: str) -> None:
    store.put_bytes(f"{QUEUE}{job_id}", json.dumps({"at": time.time()}).encode())


def idle_limit() -> float:
    """`SPOTRUN_CONTROLLER_IDLE` seconds, else DEFAULT_IDLE."""
    import os

    try:
        return max(1.0, float(os.environ.get("SPOTRUN_CONTROLLER_IDLE", DEFAULT_IDLE)))
    except ValueError:
        return DEFAULT_IDLE


def ensure_host(store: Store, provider: Provider, *, idle: float | None = None) -> dict[str, Any]:
    """A live controller host for this store: the one running, or one launched now."""
    from spotrun.clouds.base import Boot

    idle = idle_limit() if idle is None else idle
    info = host_info(store)
    if info is not None and lease_live(info, time.time()):
        return info
    if getattr(provider, "name", "") != "local":
        raise NotImplementedError("controller: cloud runs its host on the local provider only, so far")
    holder = Holder(uuid.uuid4().hex, "launching", 0)  # not a process: only expiry frees it
    lease = Lease(store, HOST_JOB, holder=holder, ttl=BOOT_GRACE, key=HOST_KEY)
    offer = pick_offer(provider.market_offers())  # type: ignore[attr-defined]
    lease.extra = {
        "provider": offer.provider,
        "instance_type": offer.instance_type,
        "zone": offer.zone,
        "hourly_price": offer.ondemand_price,
        "started_at": time.time(),
    }
    if not lease.acquire():  # another launch is starting one right now
        return host_info(store) or {}
    command = [sys.executable, "-m", "spotrun.control.durable.serve", "--store", store.url]
    command += ["--holder", holder.id, "--idle", str(idle), "--local-root", str(getattr(provider, "root", ""))]
    setattr(provider, "agent_command", command)  # noqa: B010 - the local provider's instance program
    boot = Boot(job_id=HOST_JOB, attempt=1, store_url=store.url, job_prefix=f"jobs/{HOST_JOB}")
    instance = provider.launch(offer, spot=False, boot=boot, client_token=f"{HOST_JOB}-{holder.id}")
    store.put_bytes(INSTANCE_KEY, json.dumps(instance.to_dict()).encode())
    return host_info(store) or {}
