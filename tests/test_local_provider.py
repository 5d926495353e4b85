"""The local provider with real processes: a stand-in Agent (tests/fixtures_local/fake_agent.py)
runs in each instance, so these tests check the provider's side of the contract (sandbox, notice,
kill, capacity, idempotency, survival) without a Store or torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spotrun.clock import FakeClock
from spotrun.clouds.base import BadRequest, Boot, Instance, InstanceState, InstanceStatus, NoCapacity
from spotrun.clouds.local.host import marked_processes
from spotrun.clouds.local.provider import LocalProvider
from spotrun.clouds.store import LocalStore

FAKE_AGENT = str(Path(__file__).parent / "fixtures_local" / "fake_agent.py")

MARKET = """
time_scale: 60
notice: 0.5
boot: 0.1
zones:
  - {zone: fast, region: r1, instance_type: t, vcpus: 1, memory_gb: 1, spot_price: 0.1, ondemand_price: 0.3,
     preempt_after: [0.4, 0.4]}
  - {zone: calm, region: r1, instance_type: t, vcpus: 1, memory_gb: 1, spot_price: 0.2, ondemand_price: 0.3,
     capacity: 1}
  - {zone: down, region: r2, instance_type: t, vcpus: 1, memory_gb: 1, spot_price: 0.1, ondemand_price: 0.3,
     outages: [[0, 1000]]}
  - {zone: traced, region: r2, instance_type: t, vcpus: 1, memory_gb: 1, spot_price: 0.1, ondemand_price: 0.3,
     trace: {available: [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], tick_seconds: 0.4}}
"""


@pytest.fixture
def market_file(tmp_path: Path) -> Path:
    path = tmp_path / "market.yaml"
    path.write_text(textwrap.dedent(MARKET))
    return path


@pytest.fixture
def make(tmp_path: Path, market_file: Path) -> Iterator[Callable[..., LocalProvider]]:
    """Providers over one root; every instance under it is terminated (and checked gone) at the end."""
    root = tmp_path / "local"

    def factory(**kw: object) -> LocalProvider:
        return LocalProvider(market_file, root=root, agent_command=[sys.executable, FAKE_AGENT], **kw)  # type: ignore[arg-type]

    yield factory
    provider = factory()
    for sandbox in (root / "instances").iterdir() if (root / "instances").is_dir() else []:
        instance = Instance.from_dict(json.loads((sandbox / "instance.json").read_text())["instance"])
        provider.terminate(instance)
        assert marked_processes(instance.instance_id) == []


def boot(job: str = "job1", attempt: int = 1, **env: str) -> Boot:
    return Boot(job_id=job, attempt=attempt, store_url="file:///nowhere", job_prefix=f"jobs/{job}", env=env)


def offer(p: LocalProvider, zone: str):  # noqa: ANN201
    return next(o for o in p.market_offers() if o.zone == zone)


def wait(
    p: LocalProvider, inst: Instance, until: Callable[[InstanceState], bool], timeout: float = 10
) -> InstanceState:
    end = time.monotonic() + timeout
    while True:
        state = p.poll(inst)
        if until(state):
            return state
        assert time.monotonic() < end, f"still {state} after {timeout}s"
        time.sleep(0.02)


def events(inst: Instance) -> list[dict]:
    path = Path(inst.details["sandbox"]) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def dead(pid: int) -> bool:
    """Gone or a zombie, read straight from the kernel."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def host_pid(inst: Instance) -> int:
    return int((Path(inst.details["sandbox"]) / "host.pid").read_text())


# --------------------------------------------------------------------------- lifecycle


def test_instance_runs_the_agent_in_its_sandbox_and_reports_its_exit(make: Callable[..., LocalProvider]) -> None:
    p = make()
    b = boot(FAKE_EXIT="3", FAKE_RUN="0.2")
    inst = p.launch(offer(p, "calm"), spot=True, boot=b, client_token="t1")
    assert b.notice == {}  # the caller's boot record is not changed
    assert (inst.provider, inst.zone, inst.region, inst.spot, inst.job_id) == ("local", "calm", "r1", True, "job1")
    assert p.poll(inst).status in (InstanceStatus.PENDING, InstanceStatus.RUNNING)
    wait(p, inst, lambda s: s.status == InstanceStatus.RUNNING)
    final = wait(p, inst, lambda s: not s.alive)
    assert final == InstanceState(InstanceStatus.EXITED, 3, "the Agent exited with 3")
    start = events(inst)[0]
    sandbox = Path(inst.details["sandbox"])
    assert sandbox == p.root / "instances" / inst.instance_id
    assert start["cwd"] == start["agent_root"] == str(sandbox / "root")
    assert start["boot"] == {"kind": "local", "path": str(sandbox / "meta" / "notice.json")}
    assert not (sandbox / "meta" / "notice.json").exists()
    end = time.monotonic() + 10  # generous: a loaded 2-core machine delays the host's last steps
    while not dead(host_pid(inst)) and time.monotonic() < end:  # it exits right after its last word
        time.sleep(0.02)
    assert not (sandbox / "root").exists()  # the instance's disk went with it
    assert dead(host_pid(inst))


def test_launch_is_idempotent_on_the_client_token_across_objects_and_processes(
    make: Callable[..., LocalProvider], market_file: Path
) -> None:
    p1, p2 = make(), make()
    first = p1.launch(offer(p1, "fast"), spot=True, boot=boot(), client_token="same")
    assert p2.launch(offer(p2, "calm"), spot=True, boot=boot(), client_token="same") == first
    code = textwrap.dedent(f"""
        import json, sys
        from spotrun.clouds.local.provider import LocalProvider
        from spotrun.clouds.base import Boot
        p = LocalProvider({str(market_file)!r}, root={str(p1.root)!r})
        o = p.market_offers()[0]
        i = p.launch(o, spot=True, boot=Boot("job1", 1, "file:///nowhere", "jobs/job1"), client_token="same")
        print(i.instance_id)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == first.instance_id
    assert [d.name for d in (p1.root / "instances").iterdir()] == [first.instance_id]
    other = p1.launch(offer(p1, "fast"), spot=True, boot=boot(), client_token="another")
    assert other.instance_id != first.instance_id


def test_no_capacity_unknown_zone_outage_and_capacity_limit(make: Callable[..., LocalProvider]) -> None:
    clock = FakeClock()
    p = make(clock=clock)
    o = offer(p, "down")
    with pytest.raises(NoCapacity, match="capacity outage until market time 1000s"):
        p.launch(o, spot=True, boot=boot(), client_token="a")
    with pytest.raises(NoCapacity, match="capacity outage"):
        p.launch(o, spot=False, boot=boot(), client_token="b")
    clock.advance(1000)  # market time runs from the job's first launch attempt
    p.launch(o, spot=False, boot=boot(), client_token="c")
    with pytest.raises(NoCapacity, match="no 'mars/t'"):
        p.launch(o.__class__(**{**o.to_dict(), "zone": "mars"}), spot=True, boot=boot(), client_token="d")
    with pytest.raises(BadRequest):
        p.launch(o.__class__(**{**o.to_dict(), "provider": "aws"}), spot=True, boot=boot(), client_token="e")
    calm = offer(p, "calm")
    first = p.launch(calm, spot=True, boot=boot(), client_token="f")
    with pytest.raises(NoCapacity, match="all 1 instances in use"):
        p.launch(calm, spot=False, boot=boot("job2"), client_token="g")
    p.terminate(first)
    p.launch(calm, spot=False, boot=boot("job2"), client_token="g")


# --------------------------------------------------------------------------- preemption


def test_notice_file_then_every_process_is_killed_after_the_notice(make: Callable[..., LocalProvider]) -> None:
    p = make()
    inst = p.launch(offer(p, "fast"), spot=True, boot=boot(FAKE_CHILDREN="1"), client_token="t")
    noticed = wait(p, inst, lambda s: "notice" in s.reason or not s.alive)
    assert noticed.status == InstanceStatus.RUNNING, noticed
    notice = json.loads((Path(inst.details["sandbox"]) / "meta" / "notice.json").read_text())
    assert notice["deadline"] == pytest.approx(notice["issued_at"] + 0.5)
    start = events(inst)[0]
    pids = [start["pid"], *start["children"]]
    assert len(set(marked_processes(inst.instance_id)) & set(pids)) == 3  # all alive during the notice
    final = wait(p, inst, lambda s: not s.alive)
    ended = time.time()
    assert final.status == InstanceStatus.PREEMPTED
    assert final.reason == "preempted by the market (preempt_after[0]) after a 0.5s notice"
    assert ended >= notice["deadline"]
    seen = [e for e in events(inst) if e["event"] == "notice"]
    assert seen and 0 < seen[0]["seconds_left"] <= 0.5  # the Agent saw it in time
    assert all(dead(pid) for pid in pids)  # its own group and the child in another session too
    assert marked_processes(inst.instance_id) == []


def test_preempt_hook_without_notice_kills_at_once(make: Callable[..., LocalProvider]) -> None:
    p = make()
    inst = p.launch(offer(p, "calm"), spot=True, boot=boot(), client_token="t")
    wait(p, inst, lambda s: s.status == InstanceStatus.RUNNING and bool(events(inst)))
    asked = time.monotonic()
    p.preempt(inst, notice=0)
    final = wait(p, inst, lambda s: not s.alive)
    assert time.monotonic() - asked < 1.0  # the controller can notice within a second
    assert final == InstanceState(InstanceStatus.PREEMPTED, None, "preempted on request, without notice")
    assert not (Path(inst.details["sandbox"]) / "meta" / "notice.json").exists()
    assert dead(events(inst)[0]["pid"])


def test_an_agent_that_exits_during_the_notice_ends_the_instance_early(make: Callable[..., LocalProvider]) -> None:
    p = make()
    inst = p.launch(offer(p, "calm"), spot=True, boot=boot(FAKE_ON_NOTICE="exit"), client_token="t")
    wait(p, inst, lambda s: s.status == InstanceStatus.RUNNING and bool(events(inst)))
    asked = time.monotonic()
    p.preempt(inst, notice=30)
    final = wait(p, inst, lambda s: not s.alive)
    assert time.monotonic() - asked < 5
    assert (final.status, final.exit_code) == (InstanceStatus.PREEMPTED, 0)


def test_on_demand_instances_are_never_preempted(make: Callable[..., LocalProvider]) -> None:
    p = make()
    inst = p.launch(offer(p, "fast"), spot=False, boot=boot(FAKE_EXIT="0", FAKE_RUN="1.0"), client_token="t")
    final = wait(p, inst, lambda s: not s.alive)
    assert final == InstanceState(InstanceStatus.EXITED, 0, "")  # preempt_after (0.4 s) is for spot only


def test_preemption_schedule_is_kept_per_job_under_the_root(make: Callable[..., LocalProvider]) -> None:
    def plan(inst: Instance) -> dict:
        config = json.loads((Path(inst.details["sandbox"]) / "instance.json").read_text())
        return {**config["plan"], "k": config["market"]["launch_index"]}

    p = make()
    o = offer(p, "fast")
    a = p.launch(o, spot=True, boot=boot(), client_token="1")
    b = make().launch(o, spot=True, boot=boot(attempt=2), client_token="2")  # another object: same market
    c = make().launch(o, spot=True, boot=boot(attempt=3), client_token="3")
    other_job = p.launch(o, spot=True, boot=boot("job2"), client_token="4")
    assert [plan(i)["cause"] for i in (a, b)] == ["preempt_after[0]", "preempt_after[1]"]
    assert plan(c)["cause"] in ("rate", "") and plan(c)["k"] == 2
    assert plan(other_job)["cause"] == "preempt_after[0]"  # each job replays the market from its start
    assert plan(a)["preempt_in"] == pytest.approx(0.5)  # boot 0.1 + 0.4
    fresh = make(fresh_market=True).launch(o, spot=True, boot=boot(attempt=4), client_token="5")
    assert plan(fresh)["k"] == 0


def test_trace_driven_zone_preempts_when_the_trace_turns_unavailable(make: Callable[..., LocalProvider]) -> None:
    p = make()
    o = offer(p, "traced")
    inst = p.launch(o, spot=True, boot=boot(), client_token="t")  # tick 0: available; tick 2 (0.8 s) is not
    final = wait(p, inst, lambda s: not s.alive)
    assert final.status == InstanceStatus.PREEMPTED and "(trace)" in final.reason
    assert p.market_time("job1") >= 0.8 + 0.5 - 0.05
    with pytest.raises(NoCapacity, match="no spot capacity"):
        p.launch(o, spot=True, boot=boot(attempt=2), client_token="t2")
    assert p.launch(o, spot=False, boot=boot(attempt=3, FAKE_EXIT="0"), client_token="t3")  # on-demand: fine


# --------------------------------------------------------------------------- stopping and finding


def test_terminate_leaves_no_process_and_is_idempotent(make: Callable[..., LocalProvider]) -> None:
    p = make()
    inst = p.launch(offer(p, "calm"), spot=True, boot=boot(FAKE_CHILDREN="1"), client_token="t")
    wait(p, inst, lambda s: s.status == InstanceStatus.RUNNING and bool(events(inst)))
    start = events(inst)[0]
    p.terminate(inst)
    assert p.poll(inst) == InstanceState(InstanceStatus.TERMINATED, None, "terminated by request")
    assert all(dead(pid) for pid in [host_pid(inst), start["pid"], *start["children"]])
    assert marked_processes(inst.instance_id) == []
    p.terminate(inst)
    assert p.poll(inst).status == InstanceStatus.TERMINATED
    done = p.launch(offer(p, "calm"), spot=True, boot=boot(FAKE_EXIT="0"), client_token="u")
    wait(p, done, lambda s: not s.alive)
    p.terminate(done)
    assert p.poll(done).status == InstanceStatus.EXITED  # an ended instance keeps its end


def test_terminate_while_booting(make: Callable[..., LocalProvider], market_file: Path) -> None:
    slow = market_file.with_name("slow.yaml")
    slow.write_text(market_file.read_text().replace("boot: 0.1", "boot: 30"))
    p = make()
    slow_boot = LocalProvider(slow, root=p.root, agent_command=[sys.executable, FAKE_AGENT])
    inst = slow_boot.launch(offer(p, "fast"), spot=False, boot=boot(), client_token="t")
    time.sleep(0.3)
    assert p.poll(inst).status == InstanceStatus.PENDING
    p.terminate(inst)
    assert p.poll(inst) == InstanceState(InstanceStatus.TERMINATED, None, "terminated while booting")
    assert dead(host_pid(inst)) and not events(inst)  # the Agent never started


def test_list_owned_returns_the_live_instances_of_a_job(make: Callable[..., LocalProvider]) -> None:
    p = make()
    a = p.launch(offer(p, "fast"), spot=False, boot=boot(), client_token="a")
    b = p.launch(offer(p, "fast"), spot=False, boot=boot("job2"), client_token="b")
    c = p.launch(offer(p, "fast"), spot=False, boot=boot(attempt=2, FAKE_EXIT="0"), client_token="c")
    wait(p, c, lambda s: not s.alive)
    assert [i.instance_id for i in make().list_owned("job1")] == [a.instance_id]
    assert [i.instance_id for i in p.list_owned("job2")] == [b.instance_id]
    p.terminate(a)
    assert p.list_owned("job1") == []
    assert p.list_owned("nobody") == []


def test_instances_survive_the_controller_being_killed(make: Callable[..., LocalProvider], market_file: Path) -> None:
    p = make()
    code = textwrap.dedent(f"""
        import json, sys, time
        from spotrun.clouds.local.provider import LocalProvider
        from spotrun.clouds.base import Boot
        p = LocalProvider({str(market_file)!r}, root={str(p.root)!r}, agent_command=[sys.executable, {FAKE_AGENT!r}])
        o = next(o for o in p.market_offers() if o.zone == "calm")
        i = p.launch(o, spot=True, boot=Boot("job1", 1, "file:///nowhere", "jobs/job1"), client_token="x")
        print(json.dumps(i.to_dict()), flush=True)
        time.sleep(60)
    """)
    controller = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert controller.stdout is not None
        inst = Instance.from_dict(json.loads(controller.stdout.readline()))
        wait(p, inst, lambda s: s.status == InstanceStatus.RUNNING)
    finally:
        controller.send_signal(signal.SIGKILL)
        controller.wait()
    time.sleep(0.3)
    assert p.poll(inst).status == InstanceStatus.RUNNING
    assert not dead(host_pid(inst)) and not dead(events(inst)[0]["pid"])
    assert [i.instance_id for i in p.list_owned("job1")] == [inst.instance_id]
    p.terminate(inst)
    assert marked_processes(inst.instance_id) == []


def test_a_dead_hypervisor_is_reported_failed_and_its_processes_cleaned(make: Callable[..., LocalProvider]) -> None:
    p = make()
    inst = p.launch(offer(p, "calm"), spot=True, boot=boot(FAKE_CHILDREN="1"), client_token="t")
    wait(p, inst, lambda s: s.status == InstanceStatus.RUNNING and bool(events(inst)))
    os.kill(host_pid(inst), signal.SIGKILL)
    final = wait(p, inst, lambda s: not s.alive, timeout=5)
    assert final == InstanceState(InstanceStatus.FAILED, None, "the instance's hypervisor died")
    assert marked_processes(inst.instance_id) == []


# --------------------------------------------------------------------------- with the real Agent


def real_agent_job(tmp_path: Path, run: str) -> tuple[LocalStore, Boot]:
    from spotrun.agent.jobfile import AgentJob, job_key

    store = LocalStore(tmp_path / "store")
    job = AgentJob(job_id="real", name="real", run=run, upload_budget=0.5, heartbeat_interval=0.5)
    store.put_bytes(job_key("jobs/real"), job.to_json().encode())
    return store, Boot(job_id="real", attempt=1, store_url=store.url, job_prefix="jobs/real")


def test_real_agent_runs_the_job_from_the_store(tmp_path: Path, market_file: Path) -> None:
    pytest.importorskip("spotrun.agent.main")
    store, b = real_agent_job(tmp_path, "echo hello from $SPOTRUN_JOB_ID; exit 0")
    p = LocalProvider(market_file, root=tmp_path / "local")
    inst = p.launch(offer(p, "calm"), spot=True, boot=b, client_token="r")
    final = wait(p, inst, lambda s: not s.alive, timeout=30)
    assert (final.status, final.exit_code) == (InstanceStatus.EXITED, 0), final
    assert json.loads(store.get_bytes("jobs/real/attempts/1/exit"))["reason"] == "completed"
    logs = b"".join(store.get_bytes(k) for k in store.list("jobs/real/attempts/1/log/"))
    assert b"hello from real" in logs


def test_real_agent_gets_the_notice_and_the_workload_its_sigterm(tmp_path: Path, market_file: Path) -> None:
    pytest.importorskip("spotrun.agent.main")
    run = 'trap "echo got SIGTERM; exit 0" TERM; echo started; while true; do sleep 0.05; done'
    store, b = real_agent_job(tmp_path, run)
    p = LocalProvider(market_file, root=tmp_path / "local")
    inst = p.launch(offer(p, "calm"), spot=True, boot=b, client_token="r")
    try:
        end = time.monotonic() + 30
        while b"started" not in b"".join(store.get_bytes(k) for k in store.list("jobs/real/attempts/1/log/")):
            assert time.monotonic() < end and p.poll(inst).alive, p.poll(inst)
            time.sleep(0.1)
        p.preempt(inst, notice=3)
        final = wait(p, inst, lambda s: not s.alive, timeout=10)
        assert final.status == InstanceStatus.PREEMPTED, final
        assert json.loads(store.get_bytes("jobs/real/attempts/1/exit"))["reason"] == "preempted"
        logs = b"".join(store.get_bytes(k) for k in store.list("jobs/real/attempts/1/log/"))
        assert b"got SIGTERM" in logs
    finally:
        p.terminate(inst)
    assert marked_processes(inst.instance_id) == []
