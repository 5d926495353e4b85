"""`controller: cloud` on the local provider (issue 16, item 1): `launch --detach` hands the job to
a controller host (an on-demand instance of the cheapest type, no GPU) that serves every detached
job of the store, and deletes itself once idle. The launching machine's processes all exit."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from spotrun.clouds.local.provider import LocalProvider
from spotrun.clouds.store import open_store
from spotrun.control.durable.host import HOST_JOB, host_info
from tests.e2e.test_durable_e2e import (
    PHASES,
    Sampler,
    World,
    _kill_moment,
    _reap_controllers,
    _wait,
    check_adopted_run,
)
from tests.test_faults_kill import MARKET, TOTAL, reference  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e

SMALL = """
  - {zone: z-c, region: r-1, instance_type: sim.small, vcpus: 2, memory_gb: 4,
     spot_price: 0.006, ondemand_price: 0.02, interruption_rate: 0.0}
"""


def cloud_world(tmp: Path, *, idle: str) -> tuple[World, LocalProvider]:
    """Machines around one store under `controller: cloud` (A launches), whose local market has a
    small CPU offer for the controller host, which deletes itself after `idle` seconds idle."""
    world = World(tmp)
    (tmp / "market.yaml").write_text(MARKET.rstrip() + SMALL)
    config = tmp / "config.yaml"
    config.write_text("controller: cloud\n")
    world.extra_env["a"] = {"SPOTRUN_CONFIG": str(config), "SPOTRUN_CONTROLLER_IDLE": idle}
    return world, LocalProvider(tmp / "market.yaml", root=world.cloud)


def controller_logs(tmp: Path) -> str:
    """Every controller's and controller host's log under the test's folder (their tails), for a
    failure message: which process drove what, and why each one stopped."""
    parts = []
    for log in sorted(tmp.rglob("*.log")):
        if log.name.startswith("controller-") or log.name == "host.log":
            text = log.read_text(errors="replace")[-1500:]
            parts.append(f"--- {log.relative_to(tmp)}\n{text}")
    return "\n".join(parts)


def test_controller_host_serves_detached_jobs_and_deletes_itself_when_idle(tmp_path: Path) -> None:
    world, provider = cloud_world(tmp_path, idle="3")

    planned = world.cli("a", "plan", str(world.spec), "--json")
    assert planned.returncode == 0, planned.stderr
    estimate = json.loads(planned.stdout)["controller_host"]
    assert (estimate["instance_type"], estimate["hourly_usd"]) == ("sim.small", 0.02)
    assert estimate["job_share_usd"] == round(0.02 * (0.1 + 3 / 3600), 4)  # workload.hours + the idle tail

    first = world.launch_detached()
    second = world.launch_detached()  # the same host serves it: no second host
    hosts = provider.list_owned(HOST_JOB)
    assert len(hosts) == 1 and hosts[0].instance_type == "sim.small" and not hosts[0].spot
    assert not (tmp_path / "a" / f"controller-{first}.log").exists()  # nothing runs on A

    out = world.cli("b", "status", first, "--store", world.store_url, "--json")
    assert out.returncode == 0, out.stderr
    cost = json.loads(out.stdout)["controller_host"]
    assert (cost["instance_type"], cost["hourly_usd"], cost["monthly_usd_if_always_on"]) == ("sim.small", 0.02, 14.6)

    waited = world.cli("b", "wait", first, "--store", world.store_url)
    assert waited.returncode == 0, waited.stderr[-2000:]
    assert not (tmp_path / "b" / f"controller-{first}.log").exists()  # the host drove it, not B
    local = world.cli("a", "wait", second)  # A's own database sees the host drives it: follows the store
    assert local.returncode == 0, local.stderr[-2000:]
    logs = world.cli("b", "logs", second, "--store", world.store_url)
    assert f"completed {TOTAL}\n" in logs.stdout

    store = open_store(world.store_url)
    assert _wait(lambda: not any(provider.poll(i).alive for i in provider.list_owned(HOST_JOB)), 30)
    info = host_info(store)
    assert info is not None and info["holder"] is None  # released, then its instance deleted itself
    assert store.list("controller/jobs/") == []


def test_a_dead_controller_host_is_replaced_and_its_job_adopted(tmp_path: Path) -> None:
    """The host's instance is deleted mid-job (every process on it killed): `wait --store` on B
    notices and adopts the job's running instance; the next detached launch starts a new host."""
    world, provider = cloud_world(tmp_path, idle="2")
    job = world.launch_detached()
    view = world.view(job)
    assert _wait(lambda: world.progress(view) >= 5)
    (host,) = provider.list_owned(HOST_JOB)
    provider.terminate(host)  # the controller host dies with its controllers
    waited = world.cli("b", "wait", job, "--store", world.store_url)
    assert waited.returncode == 0, waited.stderr[-2000:]
    assert "started one here" in waited.stderr
    view.refresh()
    assert [a.n for a in view.attempts() if a.started_at is not None] == [1]  # adopted, not relaunched
    again = world.launch_detached()  # the dead host's lease is noticed: a new host serves this job
    try:
        waited = world.cli("b", "wait", again, "--store", world.store_url, timeout=150)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"wait did not end: {e.stderr!r}\n{controller_logs(tmp_path)}") from None
    assert waited.returncode == 0, f"{waited.stderr[-2000:]}\n{controller_logs(tmp_path)}"
    assert len(provider.list_owned(HOST_JOB)) >= 1
    assert _wait(lambda: not any(provider.poll(i).alive for i in provider.list_owned(HOST_JOB)), 30)


@pytest.mark.parametrize("seed", range(5))
def test_controller_host_killed_at_a_seeded_moment_is_replaced_and_the_job_ends_bitwise_right(
    tmp_path: Path,
    seed: int,
    reference: dict[str, str],  # noqa: F811 - the uninterrupted run, from test_faults_kill
) -> None:
    """`controller: cloud`: the controller host's instance is deleted (every process on it killed,
    the job's controller with them) at a seeded moment: while the job launches, runs, gets a
    preemption notice, is relaunched, or completes. `wait --store` on B notices the job has no
    live controller and starts one, which adopts the running instance (or relaunches after the
    preemption). Never two instances or open attempts at once; the outputs and the final
    checkpoint are bitwise the uninterrupted run's; the workload never runs again once done."""
    rng = random.Random(1800 + seed)
    phase = PHASES[seed % len(PHASES)]
    world, provider = cloud_world(tmp_path, idle="2")
    job = world.launch_detached()
    view = world.view(job)
    sampler = Sampler(world, job)
    try:
        reached = _kill_moment(phase, rng, world, view)
        hosts = provider.list_owned(HOST_JOB)
        assert len(hosts) == 1, hosts
        provider.terminate(hosts[0])  # the host and the controllers on it die: no cleanup, no release
        try:
            waited = world.cli("b", "wait", job, "--store", world.store_url, "--json", timeout=150)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"{phase}: wait did not end: {e.stderr!r}\n{controller_logs(tmp_path)}") from None
    finally:
        sampler.stop()
        _reap_controllers(world, job)
    assert waited.returncode == 0, (phase, waited.stderr[-2000:], controller_logs(tmp_path))
    assert reached or phase == "completion", f"{phase}: the kill point never came"
    check_adopted_run(world, view, phase, sampler, reference)
