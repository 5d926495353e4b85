"""What the simulator predicts is what a real launch does.

The local market replays short availability and price traces (time-compressed) in three zones;
a real job with a deadline, on-demand allowed, runs through them under the controller and the
`spotrun` policy, which the controller re-asks while an instance runs. The simulator replays
the same traces with the same policy and the same observation model (spotrun/policies/observe.py).
The launch must make the same sequence of decisions (launch, move, preemption, relaunch, in the
same zones) and land within 5% of the simulator's cost. Swapping the policy in the simulator
must break the match: the test can tell policies apart.

The scenario (10-minute ticks): zone A (spot 1.0) is preempted at 30 min, is back at 40 min and
flaps again at 60 min; zone B (spot 1.001: about A's price, but dearer, so every policy starts in
A whatever order the planner lists equal zones in) is down only at 30-35 min; zone D (2.5) never
has capacity. At 30 min both A and B answer "no capacity", so the job waits. The simulator next
looks at 40 min, finds A and B both back, and `spotrun` backs off from A, whose capacity just
preempted it, and launches in B, where it finishes (the launch, retrying all the time, finds B
back first, at 35 min: the same decisions, and waiting costs nothing);
`greedy` and `uniform-progress` relaunch in A (the cheapest) and are preempted again;
`failover` goes back to A's region first; `on-demand` never touches spot. The policy is re-asked
every tick of the simulator and every `policy_interval` of the controller while an instance runs.

The simulator is given the job's own measured pace: the workload's seconds per step (timed
here, outside the controller) and the restart overhead the launch actually paid (its billed
time less that work, per launch). The decisions do not depend on those figures; the cost does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from spotrun.control.controller import Controller, ControllerOptions
from spotrun.control.decide import job_history
from spotrun.control.state import State
from spotrun.policies import POLICIES
from spotrun.simulate.engine import SimResult, simulate_one
from spotrun.simulate.traces import ZoneTrace, load_trace
from spotrun.spec import load_spec

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TIME_SCALE = 300.0  # one real second is five simulated minutes
GAP = 600.0  # trace tick: 10 simulated minutes = 2 real seconds
TICKS = 40
A_UP = [1, 1, 1, 0, 1, 1] + [0] * (TICKS - 6)  # preempted at 30 min, back at 40, gone at 60
# Zone B on half ticks: down only at 30-35 min. The simulator, deciding once a tick, sees it down at
# 30 and up at 40 (with A); the launch, which retries every zone every round, finds it back at 35,
# before A. Were both back at the same instant, a round that asked B just before 40 min and A just
# after would launch A: the simulator sees all zones at one instant, the controller asks them one
# after another (a race of a few milliseconds that CI's loaded machine once lost).
B_GAP = GAP / 2
B_UP = [1] * 6 + [0] + [1] * (2 * TICKS - 7)
A_SPOT, B_SPOT, D_SPOT, ONDEMAND = 1.0, 1.001, 2.5, 4.0
DEADLINE_H = 3.0
STEPS = 180

ZONE = """  - zone: {zone}
    region: r-1
    instance_type: sim.gpu
    gpu: A100
    gpu_count: 1
    gpu_memory_gb: 40
    vcpus: 4
    memory_gb: 16
    ondemand_price: {od}
"""

MARKET = (
    f"name: replay\ntime_scale: {TIME_SCALE}\nnotice: 0.3\nboot: 0.1\nzones:\n"
    + ZONE.format(zone="z-a", od=ONDEMAND)
    + "    trace: {path: z-a_trace.json}\n"
    + ZONE.format(zone="z-b", od=ONDEMAND)
    + f"    spot_price: {B_SPOT}\n"
    + f"    trace: {{available: {[bool(x) for x in B_UP]}, gap_seconds: {B_GAP}}}\n"
    + ZONE.format(zone="z-d", od=ONDEMAND)
    + f"    spot_price: {D_SPOT}\n"
    + f"    trace: {{available: {[False] * TICKS}, gap_seconds: {GAP}}}\n"
)

SPEC = f"""
name: replay
resources: {{gpu: "A100:1", providers: [local]}}
workdir: work
run: python counter.py --total {STEPS} --step-time 0.1 --every 5
deadline: {DEADLINE_H}h
recovery: {{zone_cooldown: 1s, on_demand_fallback: true, policy: spotrun}}
workload: {{hours: 1.5}}
local: {{market: market.yaml}}
"""


def key(zone: str) -> str:
    return f"local/{zone}/sim.gpu"


def traces(tmp: Path) -> list[ZoneTrace]:
    # Zone A through the trace loader, as the local market reads it (a SkyPilot-style JSON with
    # prices: instance counts, not SkyNomad's inverted convention).
    (a,) = load_trace(tmp / "z-a_trace.json")
    a.name, a.ondemand_price = key("z-a"), ONDEMAND
    b = [bool(x) for x in B_UP]
    return [
        a,
        ZoneTrace(key("z-b"), "inline", B_GAP, b, prices=[B_SPOT] * len(b), ondemand_price=ONDEMAND),
        ZoneTrace(key("z-d"), "inline", GAP, [False] * TICKS, prices=[D_SPOT] * TICKS, ondemand_price=ONDEMAND),
    ]


@dataclass(frozen=True)
class Launch:
    tmp: Path
    outcomes: list[tuple[str, str, bool]]
    spent: float
    completion_h: float
    work_h: float  # the workload's measured pace, in simulated hours of work
    restart_h: float  # the measured restart overhead per launch, simulated hours


def predicted(run: Launch, policy: str) -> SimResult:
    return simulate_one(
        traces(run.tmp),
        policy,
        work_hours=run.work_h,
        deadline_hours=DEADLINE_H,
        restart_overhead_h=run.restart_h,
        ondemand_price=ONDEMAND,
        gap_seconds=GAP,
    )


def seconds_per_step(tmp: Path) -> float:
    """The counter's real pace (sleep, progress file, checkpoints), start-up excluded."""
    env = dict(os.environ, SPOTRUN_JOB_ID="calib", SPOTRUN_ATTEMPT="0")
    times = []
    for n in (10, 40):
        d = tmp / f"calib{n}"
        for sub in ("ck", "out"):
            (d / sub).mkdir(parents=True)
        env.update(
            SPOTRUN_CHECKPOINT_DIR=str(d / "ck"),
            SPOTRUN_OUTPUT_DIR=str(d / "out"),
            SPOTRUN_PROGRESS_FILE=str(d / "progress"),
            SPOTRUN_NOTICE_FILE=str(d / "notice"),
        )
        t0 = time.perf_counter()
        cmd = [sys.executable, str(tmp / "work" / "counter.py"), "--total", str(n), "--step-time", "0.1"]
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=60)
        times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / 30


def sequence(outcomes: list[tuple[str, str, bool]]) -> list[tuple[str, str, bool]]:
    """The runs: launches and how each ended. Launches that found no capacity are left out: the
    controller retries them every poll while it waits, the simulator once a tick."""
    return [(kind, zone, spot) for kind, zone, spot in outcomes if kind != "no_capacity"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    tmp = tmp_path_factory.mktemp("replay")
    (tmp / "work").mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "counter.py", tmp / "work" / "counter.py")
    (tmp / "z-a_trace.json").write_text(
        json.dumps({"metadata": {"gap_seconds": GAP}, "data": A_UP, "prices": [A_SPOT] * TICKS})
    )
    (tmp / "market.yaml").write_text(MARKET)
    (tmp / "job.yaml").write_text(SPEC)

    state = State.open_default()
    options = ControllerOptions(poll_interval=0.05, launch_retry_backoff=0.2, policy_interval=0.1)
    controller = Controller(state, options=options)
    job = controller.submit(load_spec(tmp / "job.yaml"))
    result = controller.run(job)
    assert result.exit_code == 0, result
    record = state.job(job)
    attempts = state.attempts(job)
    assert record.ended_at is not None
    to_h = TIME_SCALE / 3600.0
    history = job_history(attempts, lambda at: (at - record.created_at) * to_h)
    work_h = STEPS * seconds_per_step(tmp) * to_h
    runs = [a for a in attempts if a.started_at is not None and a.ended_at is not None]
    billed_h = sum((a.ended_at - a.started_at) * to_h for a in runs)  # type: ignore[operator]
    return Launch(
        tmp=tmp,
        outcomes=[(o.kind, o.zone, o.spot) for o in history],
        spent=result.spent,
        completion_h=(record.ended_at - record.created_at) * to_h,
        work_h=work_h,
        restart_h=max(0.0, (billed_h - work_h) / len(runs)),
    )


def test_the_launch_makes_the_simulators_decisions_at_its_cost(launched: Launch) -> None:
    sim = predicted(launched, "spotrun")
    print(
        f"measured: work {launched.work_h:.3f} h, restart {launched.restart_h:.3f} h per launch\n"
        f"launch: {launched.outcomes} ${launched.spent:.4f} {launched.completion_h:.3f} h\n"
        f"simulator: {[d[1:] for d in sim.decisions]} ${sim.cost:.4f} {sim.completion_h:.3f} h"
    )
    expected = [
        ("launched", key("z-a"), True),
        ("preempted", key("z-a"), True),
        ("launched", key("z-b"), True),  # backs off from A, whose capacity just came back
        ("finished", key("z-b"), True),
    ]
    assert sequence([d[1:] for d in sim.decisions]) == expected
    assert sequence(launched.outcomes) == expected
    # at 30 min every zone's launch found no capacity, in the simulator and in the launch
    every = {key("z-a"), key("z-b"), key("z-d")}
    assert {z for k, z, _ in launched.outcomes if k == "no_capacity"} == every
    assert {d[2] for d in sim.decisions if d[1] == "no_capacity"} == every
    assert sim.deadline_met and launched.completion_h <= DEADLINE_H
    assert launched.spent == pytest.approx(sim.cost, rel=0.05), (launched.spent, sim.cost)


@pytest.mark.parametrize("other", [p for p in POLICIES if p != "spotrun"])
def test_swapping_the_policy_breaks_the_match(launched: Launch, other: str) -> None:
    """The comparison above can fail: every other policy predicts other decisions, or a cost
    more than 5% away from what the spotrun launch spent."""
    sim = predicted(launched, other)
    same_decisions = sequence([d[1:] for d in sim.decisions]) == sequence(launched.outcomes)
    same_cost = abs(sim.cost - launched.spent) <= 0.05 * launched.spent
    assert not (same_decisions and same_cost), (other, [d[1:] for d in sim.decisions], sim.cost)
