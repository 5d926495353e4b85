"""What the simulator predicts is what a real launch does: the local market replays a short
availability trace (time-compressed), a real job runs through it under the controller and the
same policy the simulator uses, and its cost and completion time land within a small tolerance
of `simulate_one` on that trace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from spotrun.control.controller import Controller, ControllerOptions
from spotrun.control.state import State
from spotrun.simulate.engine import simulate_one
from spotrun.simulate.traces import ZoneTrace
from spotrun.spec import load_spec

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TIME_SCALE = 300.0  # one real second is five simulated minutes
GAP = 600.0  # trace tick: 10 simulated minutes = 2 real seconds
AVAILABLE = [True, True, False, False, True, True, True, True, True, True, True, True, True, True, True, True]
SPOT, ONDEMAND = 1.0, 4.0
WORK_REAL_S = 6.0  # 60 steps of 0.1 s: half an hour of simulated work
RESTART_REAL_S = 1.0  # boot + Agent + workload start, measured on this provider (about a second)

MARKET = f"""
name: replay
time_scale: {TIME_SCALE}
notice: 0.5
boot: 0.1
zones:
  - zone: z-trace
    region: r-1
    instance_type: sim.gpu
    gpu: A100
    gpu_count: 1
    gpu_memory_gb: 40
    vcpus: 4
    memory_gb: 16
    spot_price: {SPOT}
    ondemand_price: {ONDEMAND}
    trace: {{available: {[int(a) for a in AVAILABLE]}, gap_seconds: {GAP}}}
"""

SPEC = """
name: replay
resources: {gpu: "A100:1", providers: [local]}
workdir: work
run: python counter.py --total 60 --step-time 0.1 --every 5
recovery: {zone_cooldown: 1m, on_demand_fallback: false}
workload: {hours: 0.5}
local: {market: market.yaml}
"""


def test_a_local_launch_replaying_a_trace_matches_the_simulator(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "counter.py", tmp_path / "work" / "counter.py")
    (tmp_path / "market.yaml").write_text(MARKET)
    (tmp_path / "job.yaml").write_text(SPEC)

    state = State.open_default()
    options = ControllerOptions(poll_interval=0.05, launch_retry_backoff=0.2, policy_interval=1e9)
    controller = Controller(state, options=options)
    job = controller.submit(load_spec(tmp_path / "job.yaml"))
    result = controller.run(job)
    assert result.exit_code == 0 and result.preemptions == 1

    record = state.job(job)
    assert record.ended_at is not None
    completion_h = (record.ended_at - record.created_at) * TIME_SCALE / 3600.0
    trace = ZoneTrace(
        name="local/z-trace/sim.gpu",
        source="inline",
        gap_seconds=GAP,
        available=AVAILABLE,
        prices=[SPOT] * len(AVAILABLE),
        ondemand_price=ONDEMAND,
    )
    predicted = simulate_one(
        [trace],
        "spotrun",
        work_hours=WORK_REAL_S * TIME_SCALE / 3600.0,
        deadline_hours=None,
        restart_overhead_h=RESTART_REAL_S * TIME_SCALE / 3600.0,
    )
    # The simulator counts whole trace ticks (10 simulated minutes); the launch runs continuously.
    print(
        f"launch {completion_h:.3f} h ${result.spent:.4f}",
        f"simulator {predicted.completion_h:.3f} h ${predicted.cost:.4f}",
    )
    assert predicted.preemptions == result.preemptions
    assert completion_h == pytest.approx(predicted.completion_h, rel=0.2), (completion_h, predicted)
    assert result.spent == pytest.approx(predicted.cost, rel=0.2), (result.spent, predicted)
