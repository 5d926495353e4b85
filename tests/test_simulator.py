"""The replay engine, the offline bound, multi-zone vs single zone, and `spotrun simulate`."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from spotrun.policies import POLICIES, make_policy
from spotrun.policies.base import Decision, Observation
from spotrun.simulate.engine import run, simulate_one
from spotrun.simulate.model import JobModel, Market
from spotrun.simulate.offline import offline_bound
from spotrun.simulate.traces import ZoneTrace, load_trace

DATA = Path(os.environ.get("SPOTRUN_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not present")


class Scripted:
    """A policy that plays a fixed list of decisions, one per tick (then waits)."""

    name = "scripted"

    def __init__(self, script: list[Decision]) -> None:
        self.script = script
        self.t = 0

    def decide(self, obs: Observation) -> Decision:
        d = self.script[self.t] if self.t < len(self.script) else Decision.wait()
        self.t += 1
        return d

    def on_preempted(self, zone_key: str, now_h: float) -> None:
        return None

    def on_launch_failed(self, zone_key: str, now_h: float) -> None:
        return None

    def observe(self, now_h: float, zones: object) -> None:
        return None


def random_market(rng: random.Random, zones: int, ticks: int, gap_h: float) -> Market:
    m = Market.simple(
        {f"z{i}": "".join("1" if rng.random() < 0.6 else "0" for _ in range(ticks)) for i in range(zones)}, gap_h=gap_h
    )
    m.spot_price = [[round(rng.uniform(0.5, 1.5), 2) for _ in range(ticks)] for _ in range(zones)]
    m.ondemand_price = [3.0 + i * 0.1 for i in range(zones)]
    return m


# ----------------------------------------------------------------------------- engine


def test_engine_bills_overhead_and_work() -> None:
    m = Market.simple({"a": "1" * 10}, spot=2.0)
    r = run(make_policy("greedy"), m, JobModel(3.0, 8.0, restart_overhead_h=0.5))
    assert r.cost == pytest.approx(2.0 * 3.5) and r.completion_h == pytest.approx(3.5)
    assert r.spot_hours == pytest.approx(3.5) and r.launches == 1 and r.preemptions == 0
    assert r.ondemand_reference == pytest.approx(3.0 * 3.5)


def test_overhead_longer_than_a_tick() -> None:
    m = Market.simple({"a": "1" * 10})
    r = run(make_policy("greedy"), m, JobModel(2.0, 9.0, restart_overhead_h=1.5))
    assert r.completion_h == pytest.approx(3.5)


@pytest.mark.parametrize(("notice_save", "lost", "done"), [(False, 1.0, 10.0), (True, 0.0, 9.0)])
def test_preemption_loses_work_since_checkpoint(notice_save: bool, lost: float, done: float) -> None:
    m = Market.simple({"a": "1111000" + "1" * 10})
    job = JobModel(6.0, 30.0, restart_overhead_h=0.0, checkpoint_interval_h=1.5, notice_save=notice_save)
    r = run(make_policy("failover"), m, job)
    # 4 h done by the preemption at t=4; checkpoints at 1.5 and 3.0
    assert r.preemptions == 1 and r.lost_work_h == pytest.approx(lost)
    assert r.completion_h == pytest.approx(done)
    assert [s.end for s in r.timeline] == ["preempted", "finished"]


def test_failed_launch_costs_time_not_money_and_the_policy_is_asked_again() -> None:
    """A launch into a zone without capacity answers fast: no bill, ~36 s, and the policy is
    asked again in the same tick, now seeing that zone as unavailable."""
    m = Market.simple({"a": "0011", "b": "1111"})
    seen: list[dict[str, bool | None]] = []

    class Probe(Scripted):
        def decide(self, obs: Observation) -> Decision:
            seen.append({z.key: z.available for z in obs.zones})
            return super().decide(obs)

    job = JobModel(1.0, 5.0, restart_overhead_h=0.0, failed_launch_h=0.01)
    r = run(Probe([Decision.spot("a")] + [Decision.spot("b")] * 3), m, job)
    assert r.failed_launches == 1 and r.launches == 1
    assert seen[:2] == [{"a": None, "b": None}, {"a": False, "b": None}]  # never b's capacity
    assert r.cost == pytest.approx(1.0)  # billed from the launch, not the failed attempt
    assert r.completion_h == pytest.approx(1.01)
    assert [d[1:3] for d in r.decisions] == [("no_capacity", "a"), ("launched", "b"), ("finished", "b")]


def test_the_policy_never_sees_other_zones_capacity() -> None:
    """Only the zone it runs in (True) and zones its own launch just found empty (False)."""
    views: list[dict[str, bool | None]] = []

    class Watcher(Scripted):
        def decide(self, obs: Observation) -> Decision:
            views.append({z.key: z.available for z in obs.zones})
            return super().decide(obs)

    m = Market.simple({"a": "1111", "b": "0000", "c": "1111"})
    run(Watcher([Decision.spot("a")] * 4), m, JobModel(3.0, 8.0, restart_overhead_h=0.0))
    assert views[0] == {"a": None, "b": None, "c": None}
    assert all(v == {"a": True, "b": None, "c": None} for v in views[1:])


def test_egress_when_moving_regions() -> None:
    m = Market.simple({"us-east-1a": "1100", "us-west-2a": "1111"})
    job = JobModel(3.0, 9.0, restart_overhead_h=0.0, checkpoint_gb=10.0, egress_usd_per_gb=0.02)
    r = run(make_policy("failover"), m, job)
    assert r.zone_moves == 1 and r.egress_cost == pytest.approx(0.2)
    assert r.cost == pytest.approx(3.0 + 0.2)


def test_no_market_history_before_the_start() -> None:
    seen: list[float] = []

    class Watcher(Scripted):
        def observe(self, now_h: float, zones: object) -> None:
            seen.append(now_h)

    m = Market.simple({"a": "0001111"})
    r = run(Watcher([Decision.spot("a")]), m, JobModel(1.0, 3.0, restart_overhead_h=0.0), start_tick=3)
    assert seen == []  # a controller has no record of the zones' past capacity either
    assert r.completion_h == pytest.approx(1.0)


# ----------------------------------------------------------------------------- offline bound


def test_bound_trivial_cases() -> None:
    m = Market.simple({"a": "1" * 10}, spot=1.0, ondemand=3.0)
    b = offline_bound(m, JobModel(4.0, 6.0, restart_overhead_h=0.5))
    assert b.feasible and b.cost == pytest.approx(4.5)
    nothing = Market.simple({"a": "0" * 10})
    assert offline_bound(nothing, JobModel(4.0, 6.0, restart_overhead_h=0.5)).cost == pytest.approx(13.5)
    assert not offline_bound(m, JobModel(4.0, 4.2, restart_overhead_h=0.5)).feasible


def test_bound_equals_brute_force_on_tiny_markets() -> None:
    """With exact sub-tick units, the DP finds the best schedule among all the engine can play."""
    rng = random.Random(3)
    for _ in range(6):
        m = random_market(rng, zones=2, ticks=5, gap_h=1.0)
        job = JobModel(3.0, 5.0, restart_overhead_h=0.5)
        choices = [Decision.wait(), Decision.ondemand("z0"), Decision.spot("z0"), Decision.spot("z1")]
        best = min(
            (
                r.cost
                for script in itertools.product(choices, repeat=5)
                if (r := run(Scripted(list(script)), m, job, cap_factor=1.0)).deadline_met and not r.forced_finish
            ),
            default=float("inf"),
        )
        b = offline_bound(m, job, cap_factor=1.0)
        assert b.cost == pytest.approx(best), m.available


def test_bound_never_above_a_policy_that_meets_the_deadline() -> None:
    rng = random.Random(11)
    for _ in range(25):
        m = random_market(rng, zones=rng.choice([1, 2, 3]), ticks=80, gap_h=rng.choice([0.25, 1 / 6]))
        w = rng.choice([2.0, 3.0, 5.0])
        job = JobModel(
            w,
            w * rng.choice([1.1, 1.5, 2.5]) + 0.3,
            restart_overhead_h=rng.choice([0.1, 0.2, 0.5]),
            notice_save=rng.random() < 0.5,
        )
        b = offline_bound(m, job)
        assert b.feasible
        for name in POLICIES:
            r = run(make_policy(name), m, job)
            if r.deadline_met:
                assert b.cost <= r.cost + 1e-9, (name, b.cost, r.cost)


@needs_data
def test_bound_on_a_real_trace_window() -> None:
    zones = load_trace(DATA / "skypilot_spot_strategy_raw/2022-12-13T19-23/us-west-2a_v100_1.csv") + load_trace(
        DATA / "skypilot_spot_strategy_raw/2022-12-13T19-23/us-west-2b_v100_1.csv"
    )
    m = Market.from_traces(zones, spot_price=0.9, ondemand_price=3.06).window(500, 300)
    job = JobModel(24.0, 30.0, restart_overhead_h=0.2)
    b = offline_bound(m, job)
    for name in POLICIES:
        r = run(make_policy(name), m, job)
        assert r.deadline_met or name == "failover"
        if r.deadline_met:
            assert b.cost <= r.cost + 1e-9


# ----------------------------------------------------------------------------- multi-zone


def test_multi_zone_beats_single_zone() -> None:
    """Two zones whose outages do not overlap: spotrun on both never needs on-demand."""
    a = "111100001111000011110000111100001111"
    b = "000011110000111100001111000011110000"
    job = JobModel(6.0, 8.5, restart_overhead_h=0.25)
    both = run(make_policy("spotrun"), Market.simple({"a": a, "b": b}, gap_h=0.5), job)
    alone = [run(make_policy("spotrun"), Market.simple({z: p}, gap_h=0.5), job) for z, p in (("a", a), ("b", b))]
    assert both.deadline_met and all(r.deadline_met for r in alone)
    assert both.ondemand_hours == 0
    assert all(both.cost < r.cost for r in alone)
    bound_both = offline_bound(Market.simple({"a": a, "b": b}, gap_h=0.5), job).cost
    assert all(bound_both < offline_bound(Market.simple({z: p}, gap_h=0.5), job).cost for z, p in (("a", a), ("b", b)))


# ----------------------------------------------------------------------------- entry points


def test_simulate_one_matches_run() -> None:
    z = ZoneTrace("us-east-1a", "test", 600.0, [True] * 12 + [False] * 6 + [True] * 60)
    # 1.8 h of work by the preemption at 2 h; back at 3 h: 0.2 + 2.2 h more
    r = simulate_one([z], "greedy", 4.0, 6.0, 0.2, spot_price=1.0, ondemand_price=3.0)
    assert r.deadline_met and r.preemptions == 1 and r.cost == pytest.approx(4.4)
    assert r.completion_h == pytest.approx(5.4)
    assert r.to_dict()["cost_ratio"] == pytest.approx(4.4 / (3.0 * 4.2))


def _app() -> typer.Typer:
    from spotrun.cli.simulate import simulate

    app = typer.Typer()
    app.command()(simulate)
    app.command("noop")(lambda: None)  # keep `simulate` a subcommand
    return app


def _trace(tmp_path: Path) -> Path:
    f = tmp_path / "us-west-2a_v100_1.json"
    f.write_text(json.dumps({"metadata": {"gap_seconds": 600}, "data": [1] * 20 + [0] * 10 + [1] * 100}))
    return f


def test_cli_json_and_errors(tmp_path: Path) -> None:
    f = _trace(tmp_path)
    runner = CliRunner()
    res = runner.invoke(
        _app(),
        [
            "simulate",
            "--trace",
            str(f),
            "--work-hours",
            "4",
            "--deadline-hours",
            "6",
            "--price",
            "0.9",
            "--ondemand-price",
            "3.06",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    by = {r["policy"]: r for r in data["results"]}
    assert set(by) == set(POLICIES)
    assert by["on-demand"]["cost_ratio"] == pytest.approx(1.0)
    assert by["spotrun"]["deadline_met"] and data["offline_bound"]["feasible"]
    assert data["offline_bound"]["cost"] <= by["spotrun"]["cost"] + 1e-9
    assert "never other zones' capacity" in data["observation_model"].lower()
    assert set(data["sees"]) == set(POLICIES) | {"offline_bound"}
    assert "in advance" in data["sees"]["offline_bound"] and "on-demand prices" in data["sees"]["on-demand"]
    bad = runner.invoke(_app(), ["simulate", "--trace", str(f), "--work-hours", "4", "--policy", "yolo"])
    assert bad.exit_code == 2 and "unknown policy" in bad.output
    assert runner.invoke(_app(), ["simulate", "--trace", str(f)]).exit_code == 2  # no work hours
    assert runner.invoke(_app(), ["simulate", "--work-hours", "4"]).exit_code == 0  # no --trace: the bundled one
    missing = runner.invoke(_app(), ["simulate", "--trace", str(tmp_path / "nope.json"), "--work-hours", "4"])
    assert missing.exit_code == 2
    for flag, value in [("--work-hours", "inf"), ("--work-hours", "nan"), ("--work-hours", "0"),
                        ("--deadline-hours", "inf"), ("--price", "-1"), ("--restart-overhead", "nan")]:  # fmt: skip
        args = ["simulate", "--trace", str(f), "--work-hours", "4", flag, value]
        res = runner.invoke(_app(), args)
        assert res.exit_code == 2 and res.exception is None or isinstance(res.exception, SystemExit), (flag, value)
        assert res.exit_code == 2 and flag in res.output, (flag, value, res.output)


def test_cli_with_spec_table_and_plot(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: sim\nrun: python train.py\ndeadline: 6h\nworkload:\n  hours: 4\ncheckpoint:\n  interval: 30m\n"
    )
    png = tmp_path / "out.png"
    res = CliRunner().invoke(
        _app(),
        [
            "simulate",
            str(spec),
            "--trace",
            str(_trace(tmp_path)),
            "--price",
            "0.9",
            "--ondemand-price",
            "3.06",
            "--policy",
            "greedy",
            "--policy",
            "spotrun",
            "--plot",
            str(png),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "greedy" in res.output and "spotrun" in res.output and "deadline 6 h" in res.output
    assert "allowed to see" in res.output and "offline bound: every zone's capacity" in res.output
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_module_is_cheap_to_import() -> None:
    code = (
        "import sys, spotrun.cli.simulate, spotrun.simulate.traces; "
        "bad = [m for m in ('numpy', 'matplotlib', 'torch', 'spotrun.simulate.engine') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_data
def test_bench_script_renders_the_grid(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_policies

    args = ["--data", str(DATA), "--set", "tuning", "--only", "Bamboo p3", "--starts", "1", "--jobs", "1"]
    assert bench_policies.main(args) == 0
    out = capsys.readouterr().out
    assert "## Relaunch policies" in out and "TUNING set" in out and "Observation model (honest)" in out
    assert "### Restart overhead 1x" in out and "### Restart overhead 3x" in out
    assert "| 2 | 10% |" in out


@needs_data
def test_headroom_script_bounds_the_default_from_below(capsys: pytest.CaptureFixture[str]) -> None:
    """The per-job oracle is never dearer than the best member per cell, which is never dearer
    than the default (when the default met every deadline); the table renders."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import policy_headroom

    args = ["--data", str(DATA), "--set", "tuning", "--only", "Bamboo p3", "--starts", "1", "--jobs", "1"]
    assert policy_headroom.main(args) == 0
    out = capsys.readouterr().out
    assert "#### Tuning set" in out and "per-job oracle" in out and "Reporting set" not in out
    idx = next(i for i, ts in enumerate(policy_headroom.bp.SETS) if ts.name.startswith("Bamboo p3"))
    rows = policy_headroom.one_set((idx, str(DATA), 2, 0.5))
    labels = [label for label, _ in policy_headroom.family()]
    cells = policy_headroom.summarize(rows, labels)
    assert cells and all(len(r[3]) == len(labels) for r in rows)
    for c in cells:
        assert c.oracle[0] <= c.best[0] + 1e-12
        if c.default[2] == 0:
            assert c.best[0] <= c.default[0] + 1e-12 and c.oracle[1] <= c.default[1] + 1e-12
    assert any(c.oracle[0] < c.default[0] - 1e-6 for c in cells), "the family should differ somewhere"


@needs_data
def test_bench_sets_are_split_by_date() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_policies

    eras = {ts.name: ts.era for ts in bench_policies.SETS}
    assert set(eras.values()) == {"tuning", "reporting"}
    years = {name: [int(y) for y in __import__("re").findall(r"\b(20\d\d)\b", name)] for name in eras}
    for name, era in eras.items():
        if years[name]:
            assert (min(years[name]) >= 2023) == (era == "reporting"), name
