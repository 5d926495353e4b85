"""status, wait, logs and cancel with `--store URL`: a job seen from only the store's record
(another SPOTRUN_HOME, a CI runner, a teammate's laptop), no local database needed.

`wait` and `logs -f` are what notices a job nobody drives: when no controller holds the job's
lease (expired, or held by a dead process on this host), they start a durable controller here,
which rebuilds its database from the record and adopts the running instance (the lease keeps it
to one controller even when several machines notice at once)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import typer

from spotrun.cli.jobs import CONTROLLER_GONE_GRACE, attempts_detail, exit_code_of, job_row, print_log_chunks
from spotrun.cli.output import EXIT_BAD_INPUT, EXIT_FAILED, console, escape, fail, print_json, say, say_plain

if TYPE_CHECKING:
    from spotrun.control.durable.remote import StoreView

POLL = 0.3


def _view(store_url: str, job_id: str, json_out: bool, *, patience: float = 0.0) -> StoreView:
    """The job's record; `patience` seconds of retries while it is missing (a detached controller
    writes it when it starts, just after `launch --detach` returns)."""
    from spotrun.clouds.store import StoreError
    from spotrun.control.durable.remote import NoRecord, StoreView

    end = time.monotonic() + patience
    while True:
        try:
            return StoreView(store_url, job_id)
        except NoRecord as e:
            if time.monotonic() >= end:
                raise fail(str(e.args[0]), EXIT_BAD_INPUT, json_out=json_out) from None
        except StoreError as e:
            raise fail(f"cannot read the store: {e}", json_out=json_out) from None
        time.sleep(POLL)


def _row(view: StoreView) -> dict[str, Any]:
    row = job_row(view, view.job())  # type: ignore[arg-type]  # StoreView quacks like State here
    row["controller_alive"] = view.controller_alive()
    return row


def status(store_url: str, job_id: str, json_out: bool) -> None:
    view = _view(store_url, job_id, json_out)
    j, attempts, events, now = view.job(), view.attempts(), view.events(), time.time()
    if json_out:
        row = _row(view)
        row["attempts_detail"] = attempts_detail(j, attempts, now)
        row["events"] = [{"at": e.at, "kind": e.kind, "message": e.message} for e in events]
        row["lease"] = view.lease()
        from spotrun.control.durable.host import host_cost, host_info

        row["controller_host"] = host_cost(host_info(view.store), now)
        print_json(row)
        return
    from spotrun.cli import views
    from spotrun.control.outcome import spend

    spent, ondemand = spend(attempts, now)
    console().print(views.job_detail(j, attempts, events, spent, ondemand, now))
    from spotrun.control.durable.host import host_cost, host_info

    cost = host_cost(host_info(view.store), now)
    if cost is not None and cost["alive"]:
        say(
            f"controller host: {cost['provider']} {cost['instance_type']} on-demand, "
            f"${cost['hourly_usd']:.4f}/h (${cost['monthly_usd_if_always_on']:.2f}/month if always on), "
            f"${cost['spent_usd']:.4f} so far"
        )
    if not j.status.terminal and not view.controller_alive():
        say(
            "[yellow]no controller holds this job's lease[/]: "
            f"`spotrun wait {escape(j.id)} --store {escape(store_url)}` starts one here that adopts it"
        )


class Adopter:
    """Starts a controller here when the job has none (at most once per `every` seconds)."""

    def __init__(self, store_url: str, job_id: str, json_out: bool) -> None:
        from spotrun.control.durable.lease import lease_ttl

        self.store_url, self.job_id, self.json_out = store_url, job_id, json_out
        self.every = max(CONTROLLER_GONE_GRACE, lease_ttl())
        self.last = -1e18
        self.started: list[int] = []

    def check(self, view: StoreView) -> None:
        if view.job().status.terminal or view.controller_alive():
            return
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        from spotrun.control.durable.run import spawn
        from spotrun.paths import home

        proc = spawn(self.job_id, self.store_url, home() / f"controller-{self.job_id}.log")
        self.started.append(proc.pid)
        if not self.json_out:
            say_plain(
                f"job {self.job_id} has no live controller: started one here (pid {proc.pid}) to adopt it",
                stderr=True,
            )


def wait(store_url: str, job_id: str, timeout: float | None, json_out: bool) -> None:
    patience = CONTROLLER_GONE_GRACE if timeout is None else min(timeout, CONTROLLER_GONE_GRACE)
    view = _view(store_url, job_id, json_out, patience=patience)
    job_id = view.job_id  # the id a unique prefix (or name) stood for
    adopter = Adopter(store_url, job_id, json_out)
    start = time.monotonic()
    while True:
        view.refresh()
        j = view.job()
        if j.status.terminal:
            break
        adopter.check(view)
        if timeout is not None and time.monotonic() - start >= timeout:
            raise fail(f"job {job_id} is still {j.status.value} after {timeout:g} s", EXIT_FAILED, json_out=json_out)
        time.sleep(POLL)
    if json_out:
        print_json(_row(view))
    else:
        say_plain(f"job {j.id}: {j.status.value}" + (f" ({j.reason})" if j.reason else ""))
    raise typer.Exit(exit_code_of(j))


def logs(store_url: str, job_id: str, *, follow: bool, attempt: int | None, json_out: bool) -> None:
    from spotrun.cli.logs import LogReader

    view = _view(store_url, job_id, json_out, patience=CONTROLLER_GONE_GRACE if follow else 0.0)
    job_id = view.job_id
    reader = LogReader(view, job_id, only_attempt=attempt, store=view.store)  # type: ignore[arg-type]
    if json_out:
        from spotrun.cli.jobs import _json_chunks

        chunks = [{"attempt": n, "text": text} for n, text in _json_chunks(reader)]
        print_json({"job_id": job_id, "status": view.job().status.value, "logs": chunks})
        return
    adopter = Adopter(store_url, job_id, json_out)
    while True:
        print_log_chunks(reader.poll())
        if not follow:
            return
        view.refresh()
        current = view.job()
        if current.status.terminal and reader.drained():
            raise typer.Exit(exit_code_of(current))
        adopter.check(view)
        time.sleep(0.5)


def cancel_one(store_url: str, job_id: str, wait_s: float, json_out: bool) -> dict[str, Any]:
    """Write the cancel request; the job's controller acts on it (one is started here if none)."""
    view = _view(store_url, job_id, json_out)
    job_id = view.job_id
    if view.job().status.terminal:
        return {"job_id": job_id, "status": view.job().status.value, "note": "already ended"}
    view.request_cancel()
    adopter = Adopter(store_url, job_id, True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        view.refresh()
        if view.job().status.terminal:
            return {"job_id": job_id, "status": view.job().status.value, "note": ""}
        adopter.check(view)
        time.sleep(POLL)
    return {"job_id": job_id, "status": view.job().status.value, "note": "its controller is stopping it"}


# ---------------------------------------------------------------------------- controller: cloud


def controller_mode(spec: Any = None) -> str:
    """Where detached jobs are driven: the spec's `controller`, else the config file's, else local."""
    chosen = getattr(spec, "controller", None)
    if chosen:
        return str(chosen)
    from spotrun.cli.defaults import ConfigError, load_config

    try:
        return str(load_config().get("controller") or "local")
    except ConfigError as e:
        raise fail(str(e)) from None


def hand_to_controller_host(state: Any, job_id: str, json_out: bool) -> dict[str, Any] | None:
    """`controller: cloud`: record and queue the job in its store, and make sure a controller host
    serves that store (launching one if none). None under `controller: local`."""
    from spotrun.control.specs import planning_spec

    job = state.job(job_id)
    spec = planning_spec(job.spec)
    if controller_mode(spec) != "cloud":
        return None
    from spotrun.clouds import get_provider
    from spotrun.clouds.base import ProviderError
    from spotrun.clouds.store import open_store
    from spotrun.control.durable.host import enqueue, ensure_host, host_cloud, host_cost, host_offers, job_cloud_offers
    from spotrun.control.durable.record import publish
    from spotrun.control.specs import allowed_providers, provider_options
    from spotrun.control.state import JobStatus

    store = open_store(job.store_url)
    try:
        cloud = host_cloud(allowed_providers(spec))
        provider = get_provider(cloud, **provider_options(cloud, spec))
        job_offers = [] if cloud == "local" else job_cloud_offers(cloud, spec.resources.regions)
        publish(state, store, job_id)
        enqueue(store, job_id)
        info = ensure_host(store, provider, offers=host_offers(cloud, job_offers, provider))
    except (ValueError, ProviderError) as e:
        store.delete(f"controller/jobs/{job_id}")
        why = f"controller: cloud: {e}"
        state.set_job_status(job_id, JobStatus.FAILED, time.time(), reason=why, exit_code=EXIT_BAD_INPUT)
        publish(state, store, job_id)
        raise fail(why, EXIT_BAD_INPUT, json_out=json_out) from None
    return host_cost(info, time.time()) or {}


def driven_elsewhere(job: Any) -> bool:
    """No controller runs the job here, but the store holds its record: another machine or the
    controller host drives (or drove) it, and the record is the one to follow (and `wait` adopts
    the job when nobody holds its lease)."""
    from spotrun.clouds.store import StoreError, open_store
    from spotrun.control.durable.record import read_record

    try:
        return read_record(open_store(job.store_url), job.id) is not None
    except StoreError:
        return False


def controller_host_estimate(spec: Any, offers: list[Any]) -> dict[str, Any] | None:
    """Under `controller: cloud`, what the controller host adds to a job: its offer, its price,
    and the job's share (the job's hours, when the spec gives them, plus the idle tail)."""
    if controller_mode(spec) != "cloud":
        return None
    from spotrun.control.durable.host import host_cloud, host_offers, idle_limit, pick_offer
    from spotrun.control.specs import allowed_providers

    cloud = host_cloud(allowed_providers(spec))
    try:
        offer = pick_offer(host_offers(cloud, offers))
    except ValueError:
        return {"error": f"no on-demand {cloud} offer for the controller host"}
    price = float(offer.ondemand_price or 0.0)
    hours = getattr(getattr(spec, "workload", None), "hours", None)
    idle_h = idle_limit() / 3600
    return {
        "provider": offer.provider,
        "instance_type": offer.instance_type,
        "hourly_usd": price,
        "monthly_usd_if_always_on": round(price * 730, 2),
        "idle_hours_before_self_delete": round(idle_h, 3),
        "job_share_usd": None if hours is None else round(price * (float(hours) + idle_h), 4),
    }


def say_controller_host(estimate: dict[str, Any] | None) -> None:
    if not estimate:
        return
    if "error" in estimate:
        say(f"[yellow]controller: cloud[/]: {escape(estimate['error'])}")
        return
    share = estimate["job_share_usd"]
    say(
        f"controller: cloud on {estimate['provider']} {estimate['instance_type']} on-demand at "
        f"${estimate['hourly_usd']:.4f}/h (${estimate['monthly_usd_if_always_on']:.2f}/month if always on; it "
        f"deletes itself after {estimate['idle_hours_before_self_delete'] * 60:g} min idle)"
        + (f": about ${share:.4f} for this job" if share is not None else "")
    )
