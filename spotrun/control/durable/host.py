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

On the local provider the host's instance runs `serve` directly (its instances run any command).
On AWS, GCP and Azure it boots through the clouds' ordinary boot path: the launch's Boot has
`role="controller"`, so the VM's bootstrap (clouds/vmboot.py) fetches the same content-addressed
package the Agent uses, picks a Python >= 3.11 on the image, pip-installs spotrun's control plane
and the cloud's SDK, and runs `python -m spotrun.control.durable.serve --store URL`. The catalog
holds GPU offers only, so a cloud host is a small general-purpose type of CONTROLLER_TYPES.
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
    from spotrun.clouds.base import Boot, Provider

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


# The cloud controller host's machine: a small general-purpose on-demand type (2 GiB holds the
# host and a few job controllers). Prices: on-demand list price, Linux, in us-east-1 /
# us-central1 / eastus (2025); other regions differ by a few percent.
CONTROLLER_TYPES: dict[str, tuple[str, float, float, float]] = {
    # cloud: (instance type, vCPUs, memory GiB, USD per hour)
    "aws": ("t3.small", 2, 2.0, 0.0208),
    "gcp": ("e2-small", 2, 2.0, 0.01675),
    "azure": ("Standard_B1ms", 1, 2.0, 0.0207),
}
HOME_REGION = {"aws": "us-east-1", "gcp": "us-central1", "azure": "eastus"}
FORWARDED_ENV = ("SPOTRUN_LEASE_TTL",)  # non-secret tuning the host's controllers inherit


def cloud_host_offer(cloud: str, job_offers: list[Offer]) -> Offer:
    """The controller host's offer on a cloud: CONTROLLER_TYPES' type, in the region of the job's
    cheapest offer (near its store and instances), else the cloud's home region."""
    from spotrun.catalog.model import Offer

    instance_type, vcpus, memory, price = CONTROLLER_TYPES[cloud]
    mine = [o for o in job_offers if o.provider == cloud and (o.spot_price or o.ondemand_price)]
    cheapest = min(mine, key=lambda o: float(o.spot_price or o.ondemand_price or 0.0), default=None)
    region = cheapest.region if cheapest else HOME_REGION[cloud]
    zone = cheapest.zone if cheapest and cloud == "gcp" else ""  # GCE needs a zone; EC2/Azure pick one
    if cloud == "gcp" and not zone:
        zone = f"{region}-a"
    return Offer(cloud, region, zone, instance_type, None, 0, 0.0, vcpus, memory, None, price, 0.0)


def host_cloud(providers: list[str]) -> str:
    """Where the host runs: the local provider when the job may use it, else the job's first cloud."""
    return "local" if "local" in providers or not providers else providers[0]


def job_cloud_offers(cloud: str, regions: list[str] | None) -> list[Offer]:
    """The catalog's offers of `cloud` in the spec's regions (fnmatch globs), to place the host near."""
    from fnmatch import fnmatch

    from spotrun.catalog import load_offers

    offers = load_offers([cloud])
    return [o for o in offers if not regions or any(fnmatch(o.region, r) for r in regions)]


def host_offers(cloud: str, job_offers: list[Offer], provider: Any = None) -> list[Offer]:
    """What the controller host may run on: the local market's offers, or a cloud's host offer."""
    if cloud == "local" and provider is not None:
        return list(provider.market_offers())
    if cloud == "local":
        return [o for o in job_offers if o.provider == "local"]
    return [cloud_host_offer(cloud, job_offers)]


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


def ensure_host(
    store: Store, provider: Provider, *, idle: float | None = None, offers: list[Offer] | None = None
) -> dict[str, Any]:
    """A live controller host for this store: the one running, or one launched now (on `offers`,
    by default the local market's; a cloud's come from `host_offers`)."""
    from spotrun.clouds.base import Boot

    idle = idle_limit() if idle is None else idle
    info = host_info(store)
    if info is not None and lease_live(info, time.time()):
        return info
    holder = Holder(uuid.uuid4().hex, "launching", 0)  # not a process: only expiry frees it
    lease = Lease(store, HOST_JOB, holder=holder, ttl=BOOT_GRACE, key=HOST_KEY)
    offer = pick_offer(offers if offers is not None else provider.market_offers())  # type: ignore[attr-defined]
    lease.extra = {
        "provider": offer.provider,
        "instance_type": offer.instance_type,
        "zone": offer.zone,
        "hourly_price": offer.ondemand_price,
        "started_at": time.time(),
    }
    if not lease.acquire():  # another launch is starting one right now
        return host_info(store) or {}
    if getattr(provider, "name", "") == "local":
        command = [sys.executable, "-m", "spotrun.control.durable.serve", "--store", store.url]
        command += ["--holder", holder.id, "--idle", str(idle), "--local-root", str(getattr(provider, "root", ""))]
        setattr(provider, "agent_command", command)  # noqa: B010 - the local provider's instance program
        boot = Boot(job_id=HOST_JOB, attempt=1, store_url=store.url, job_prefix=f"jobs/{HOST_JOB}")
    else:
        boot = cloud_boot(store, provider.name, holder.id, idle)
    instance = provider.launch(offer, spot=False, boot=boot, client_token=f"{HOST_JOB}-{holder.id}")
    store.put_bytes(INSTANCE_KEY, json.dumps(instance.to_dict()).encode())
    return host_info(store) or {}


def cloud_boot(store: Store, cloud: str, holder_id: str, idle: float) -> Boot:
    """The boot record of a cloud controller host: the package uploaded to the store (as for the
    Agent), `role="controller"`, and the host's lease holder id and idle limit in its env."""
    import os

    from spotrun.agent import package as agent_package
    from spotrun.clouds.base import Boot
    from spotrun.control.submitting import upload_verified

    packed = agent_package.build()
    key = agent_package.package_key(packed.sha256)
    upload_verified(store, key, packed.path, packed.size, packed.sha256, "agent")
    env = {"SPOTRUN_CONTROLLER_HOLDER": holder_id, "SPOTRUN_CONTROLLER_IDLE": f"{idle:g}"}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return Boot(
        job_id=HOST_JOB,
        attempt=1,
        store_url=store.url,
        job_prefix=f"jobs/{HOST_JOB}",
        spotrun_package=f"{store.url.rstrip('/')}/{key}",
        spotrun_sha256=packed.sha256,
        extra=cloud,
        env=env,
        role="controller",
    )
