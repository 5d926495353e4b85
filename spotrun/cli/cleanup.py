"""`spotrun rm` and `spotrun gc`: forget finished jobs, their records, controller logs and stored
files (checkpoints, outputs, logs in the store). A job that has not finished is never removed."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from spotrun.cli.jobs import JSON, find_job_or_exit, open_state
from spotrun.cli.output import fail, print_json, say_plain

if TYPE_CHECKING:
    from spotrun.control.state import Job, State


def rm(
    jobs: Annotated[list[str], typer.Argument(help="Finished jobs to forget (ids, prefixes or names).")],
    keep_files: Annotated[bool, typer.Option("--keep-files", help="Keep the job's files in the store.")] = False,
    json_out: JSON = False,
) -> None:
    """Delete finished jobs: their records, logs and stored files (checkpoints, outputs). Refuses live jobs."""
    state = open_state()
    found = [find_job_or_exit(state, ref, json_out) for ref in jobs]
    live = [j.id for j in found if not j.status.terminal]
    if live:
        raise fail(f"not finished (cancel first): {', '.join(live)}", json_out=json_out)
    removed = [_remove(state, j, keep_files) for j in found]
    if json_out:
        print_json({"removed": removed})
        return
    for r in removed:
        say_plain(f"removed {r['job_id']}" + ("" if r["files_deleted"] else " (files kept)"))


def gc(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Only jobs that ended longer ago than this (e.g. 7d, 12h, 0s).")
    ] = "7d",
    keep_files: Annotated[bool, typer.Option("--keep-files", help="Keep the jobs' files in the store.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be deleted.")] = False,
    json_out: JSON = False,
) -> None:
    """Delete every finished job (records and stored files) that ended before --older-than."""
    from spotrun.spec import units

    try:
        age = units.parse_duration_s(older_than)
    except ValueError as e:
        raise fail(f"--older-than {older_than!r}: {e}", json_out=json_out) from None
    state = open_state()
    cutoff = time.time() - age
    old = [j for j in state.jobs(None) if j.status.terminal and (j.ended_at or j.updated_at) <= cutoff]
    removed = (
        [{"job_id": j.id, "files_deleted": False} for j in old]
        if dry_run
        else [_remove(state, j, keep_files) for j in old]
    )
    roles = [] if dry_run else release_idle_controller_roles(state)
    if json_out:
        print_json({"dry_run": dry_run, "removed": removed, "controller_roles_released": roles})
        return
    verb = "would remove" if dry_run else "removed"
    say_plain(
        f"{verb} {len(removed)} finished job(s)" + (": " + ", ".join(r["job_id"] for r in removed) if removed else "")
    )
    for url in roles:
        say_plain(f"deleted the controller-host role of {url} (no host of that store runs)")


def _remove(state: State, j: Job, keep_files: bool) -> dict[str, Any]:
    from spotrun.clouds.store import StoreError, job_prefix, open_store
    from spotrun.paths import home

    deleted = False
    if not keep_files:
        urls = {j.store_url} | {a.store_url for a in state.attempts(j.id) if a.store_url}
        for url in sorted(urls):
            try:
                open_store(url).delete_prefix(job_prefix(j.id) + "/")
                deleted = True
            except (StoreError, OSError) as e:
                raise fail(f"job {j.id}: deleting its files in {url} failed ({e}); nothing removed") from None
    released = release_clouds(state, j)
    log = home() / f"controller-{j.id}.log"
    log.unlink(missing_ok=True)
    state.delete_job(j.id)
    return {"job_id": j.id, "files_deleted": deleted, **({"release_errors": released} if released else {})}


def release_clouds(state: State, j: Job) -> list[str]:
    """What each cloud made for this job alone (its per-job IAM role, service account or managed
    identity, with their bindings): released again, since a controller that crashed never reached
    its ending path. `release_job` is idempotent; a cloud that cannot be reached is reported, not
    fatal: what it keeps stays tagged with the job id (clouds/gcp/identity.py `leftover_accounts`,
    clouds/azure/identity.py `leftover_identities` list them)."""
    from spotrun.clouds import remote_clouds

    names = sorted({a.provider for a in state.attempts(j.id)} & set(remote_clouds()))
    if not names:
        return []
    from spotrun.clouds import get_provider
    from spotrun.clouds.base import ProviderError
    from spotrun.control.specs import planning_spec, provider_options

    spec = planning_spec(j.spec)
    problems = []
    for name in names:
        try:
            get_provider(name, **provider_options(name, spec)).release_job(j.id)
        except ProviderError as e:
            problems.append(f"{name}: {e}")
            say_plain(f"job {j.id}: releasing what {name} made for it failed: {e}", stderr=True)
    return problems


def release_idle_controller_roles(state: State) -> list[str]:
    """The AWS controller-host role of each S3 store this machine's jobs used (`controller: cloud`,
    clouds/aws/resources.py `controller_profile_name`), deleted when that store had a host on AWS,
    none is alive now (its lease expired or released) and no job is queued for one: the next host
    makes it again. A store or cloud that cannot be reached is skipped (the role costs nothing)."""
    from spotrun.clouds import get_provider
    from spotrun.clouds.store import open_store
    from spotrun.control.durable.host import QUEUE, host_info
    from spotrun.control.durable.lease import lease_live
    from spotrun.control.specs import planning_spec, provider_options

    stores: dict[str, Job] = {}
    for j in state.jobs(None):
        if j.store_url.startswith("s3://"):
            stores.setdefault(j.store_url, j)
    released = []
    for url, j in sorted(stores.items()):
        try:
            store = open_store(url)
            info = host_info(store)
            if info is None or info.get("provider") != "aws" or lease_live(info, time.time()) or store.list(QUEUE):
                continue
            spec = planning_spec(j.spec)
            get_provider("aws", **provider_options("aws", spec)).release_controller(url)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - an optional clean-up (a free role) never fails gc
            say_plain(f"the controller-host role of {url}: not checked ({type(e).__name__}: {e})", stderr=True)
            continue
        released.append(url)
    return released
