"""The CLI in-process (typer's CliRunner): the README command table against the app, markup
injection, job references, config defaults, overrides and --env, labels, the capacity wait."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from spotrun.cli import output
from spotrun.cli.app import app
from spotrun.control.controller import CapacityWait
from spotrun.control.state import JobStatus, State
from spotrun.spec import SpecError, parse_spec_text
from tests.cli.conftest import Env

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _fresh_consoles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTRUN_CONFIG", str(tmp_path / "config.yaml"))
    output.reset_consoles()
    yield
    output.reset_consoles()


def invoke(*args: str) -> object:
    output.reset_consoles()
    return runner.invoke(app, list(args))


# ---------------------------------------------------------------------------- README vs the app


def _app_surface() -> dict[str, set[str]]:
    """Every command path ('catalog info') -> its long flags, from the typer app itself."""
    out: dict[str, set[str]] = {}

    def walk(cmd: object, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
            return
        flags = set()
        for p in cmd.params:  # type: ignore[attr-defined]
            flags |= {o for o in [*p.opts, *getattr(p, "secondary_opts", [])] if o.startswith("--")}
        out[" ".join(path)] = flags - {"--help"}

    walk(typer.main.get_command(app), [])
    return out


def _readme_surface() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text()
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"\| `spotrun ([a-z ]+?)( \[show\])?(?: \[?[A-Z][^`]*)?` \| (.*?) \| .* \|$", line)
        if not m:
            continue
        name = m.group(1).strip() + (" show" if m.group(2) else "")  # `config [show]`: `config show`
        flags = set(re.findall(r"--[a-z][a-z0-9-]*", m.group(3)))
        out[name] = flags
    return out


def test_readme_command_table_lists_every_command_and_flag_and_nothing_else() -> None:
    app_side = _app_surface()
    readme = _readme_surface()
    assert set(readme) == set(app_side), "commands differ between README and the app"
    for name, flags in app_side.items():
        assert readme[name] == flags, f"spotrun {name}: README {sorted(readme[name])} vs app {sorted(flags)}"


def test_every_command_that_reports_takes_json() -> None:
    for name, flags in _app_surface().items():
        assert "--json" in flags, f"spotrun {name} has no --json"


# ---------------------------------------------------------------------------- markup injection


def _job_with_hostile_text(state: State) -> str:
    state.create_job("evil-1", "evil", {"labels": {}}, "file:///nowhere", time.time(), None)
    state.begin_attempt(
        "evil-1", provider="local", region="r", zone="z", instance_type="[bold]t", spot=True,
        offer_key="k", hourly_price=1.0, ondemand_price=2.0, time_scale=1.0, now=time.time(), store_url=None,
    )  # fmt: skip
    state.end_attempt("evil-1", 1, "completed", time.time(), detail="checkpoint step [/x]")
    state.add_event("evil-1", time.time(), "x", "exit record says [/x] and [red]")
    state.set_job_status("evil-1", JobStatus.SUCCEEDED, time.time(), reason="done [/x]", exit_code=0)
    return "evil-1"


def test_untrusted_text_is_never_read_as_markup() -> None:
    state = State.open_default()
    job_id = _job_with_hostile_text(state)
    for args in (["status"], ["status", job_id], ["cost"], ["cancel", job_id]):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output, result.exception)
    detail = invoke("status", job_id).output
    assert "[/x]" in detail and "[red]" in detail


def test_launch_summary_with_a_hostile_exit_record_does_not_crash() -> None:
    from spotrun.cli import views
    from spotrun.control.controller import Controller

    state = State.open_default()
    job_id = _job_with_hostile_text(state)
    result = Controller(state).result(job_id)
    output.console().print(views.result_summary(result, state.attempts(job_id)))


# ---------------------------------------------------------------------------- job references


def test_a_shared_name_is_an_error_listing_the_candidates() -> None:
    state = State.open_default()
    for i in range(2):
        state.create_job(f"same-{i}", "same", {}, "file:///x", time.time() + i, None)
    result = invoke("status", "same")
    assert result.exit_code == 2
    assert "same-0" in result.output and "same-1" in result.output
    assert invoke("status", "same-1").exit_code == 0


def test_status_says_how_many_jobs_are_hidden_and_json_lists_all() -> None:
    state = State.open_default()
    for i in range(25):
        state.create_job(f"j-{i:02d}", f"j{i}", {}, "file:///x", time.time() + i, None)
        state.set_job_status(f"j-{i:02d}", JobStatus.SUCCEEDED, time.time(), exit_code=0)
    table = invoke("status").output
    assert "5 older job(s) not shown" in table
    assert len(json.loads(invoke("status", "--json").output)) == 25
    assert len(json.loads(invoke("status", "--json", "-n", "3").output)) == 3
    assert "not shown" not in invoke("status", "-n", "0").output


# ---------------------------------------------------------------------------- config, overrides, env


def test_config_set_get_show_and_defaults_reach_the_spec(tmp_path: Path) -> None:
    assert invoke("config", "set", "providers", "local").exit_code == 0
    assert invoke("config", "set", "budget", "7").exit_code == 0
    assert invoke("config", "get", "budget").output.strip() == "7.0"
    assert invoke("config", "get", "store").exit_code == 1
    assert invoke("config", "set", "colour", "blue").exit_code == 2
    shown = json.loads(invoke("config", "show", "--json").output)
    assert shown["values"] == {"providers": ["local"], "budget": 7.0}

    from spotrun.cli.specs import Overrides, load_spec_or_exit

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("name: j\nrun: python x.py\nresources: {gpu: A100:1}\n")
    spec = load_spec_or_exit(spec_file)
    assert spec.budget == 7.0 and spec.resources.providers == ["local"]
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nexport TOKEN='s3cret'\nPLAIN=1\n")
    spec = load_spec_or_exit(
        spec_file,
        overrides=Overrides(
            gpu="H100:2", providers=["aws"], spot=False, name="other", env=["A=b"], env_files=[env_file]
        ),
    )
    assert (spec.resources.gpu.name, spec.resources.gpu.count, spec.resources.spot) == ("H100", 2, False)
    assert spec.name == "other" and spec.resources.providers == ["aws"]
    assert spec.env["TOKEN"] == "s3cret" and spec.env["A"] == "b"
    stored = json.dumps(spec.persistable())
    assert "s3cret" not in stored  # --env values are never stored
    with pytest.raises(typer.Exit) as bad:
        load_spec_or_exit(spec_file, overrides=Overrides(gpu="A1OO"))
    assert bad.value.exit_code == 2


# ---------------------------------------------------------------------------- spec additions


def test_labels_and_capacity_wait_in_the_spec() -> None:
    spec = parse_spec_text("name: j\nrun: x\nlabels: {team: nlp, tier: '1'}\nrecovery: {capacity_wait: 90s}\n")
    assert spec.labels == {"team": "nlp", "tier": "1"} and spec.recovery.capacity_wait == 90
    assert parse_spec_text("name: j\nrun: x\n").recovery.capacity_wait == 600
    with pytest.raises(SpecError) as e:
        parse_spec_text("name: j\nrun: x\nlabels: {Team: x, ok: 'A B', spotrun-job: y}\n")
    assert len(e.value.issues) == 3


def test_capacity_wait_backs_off_and_ends() -> None:
    fast = CapacityWait(limit=10.0, first=0.2)
    assert [fast.next_delay(0.0, scale=300.0) for _ in range(3)] == [0.2, 0.2, 0.2]  # 60 market s cap
    wait = CapacityWait(limit=100.0, first=2.0)
    now, delays = 0.0, []
    while (d := wait.next_delay(now)) is not None:
        delays.append(d)
        now += d
    assert delays[:4] == [2.0, 4.0, 8.0, 16.0] and max(delays) <= 60.0 and sum(delays) == pytest.approx(100.0)
    assert len(delays) < 10  # one launch per round: a handful, not one every 2 s


def test_controller_records_one_attempt_per_launch_round_on_no_capacity(env_controller) -> None:  # noqa: ANN001
    result, attempts = env_controller
    assert result.status is JobStatus.NO_CAPACITY and result.exit_code == 3
    # 60 s of waiting at a 1 s poll: a handful of launches (the policy also waits out the failed
    # zone), each one attempt row, and the result counts them
    assert result.launch_failures == len(attempts) and 1 <= len(attempts) <= 5
    gaps = [b.created_at - a.created_at for a, b in zip(attempts, attempts[1:], strict=False)]
    assert all(g >= 4 for g in gaps), gaps


@pytest.fixture
def env_controller(tmp_path: Path) -> tuple[object, list[object]]:
    """A job on a local market whose only zone is out of capacity, with a fake clock."""
    from spotrun.clock import FakeClock
    from spotrun.control.controller import Controller, ControllerOptions
    from spotrun.spec import load_spec

    env = Env(tmp_path, {})
    spec_path = env.job(outage=True, extra="")
    spec_path.write_text(spec_path.read_text().replace("capacity_wait: 2s", "capacity_wait: 60s"))
    market = spec_path.parent / "market.yaml"
    market.write_text(market.read_text().replace("time_scale: 60", "time_scale: 1"))  # a real cloud's pace
    state = State.open_default()
    clock = FakeClock()
    controller = Controller(state, clock=clock, options=ControllerOptions(poll_interval=1.0, launch_retry_backoff=4.0))
    job_id = controller.submit(load_spec(spec_path))
    result = controller.run(job_id)
    return result, state.attempts(job_id)


# ---------------------------------------------------------------------------- no controller left


def test_wait_and_logs_follow_give_up_when_no_controller_drives_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from spotrun.cli import jobs

    monkeypatch.setattr(jobs, "CONTROLLER_GONE_GRACE", 0.3)
    state = State.open_default()
    state.create_job("orphan-1", "orphan", {}, (Path(state.path).parent / "store").as_uri(), time.time(), None)
    state.set_job_status("orphan-1", JobStatus.RUNNING, time.time())
    started = time.monotonic()
    waited = invoke("wait", "orphan-1")
    assert waited.exit_code == 1 and "launch --resume orphan-1" in waited.output
    followed = invoke("logs", "orphan-1", "-f", "--json")
    assert followed.exit_code == 0  # --json is a snapshot, never a follow
    followed = invoke("logs", "orphan-1", "-f")
    assert followed.exit_code == 1 and "no controller" in followed.output
    assert time.monotonic() - started < 30
    as_json = json.loads(invoke("wait", "orphan-1", "--json").output)
    assert as_json["error"]["code"] == 1
    assert invoke("rm", "orphan-1").exit_code == 2  # not finished: refused
    assert json.loads(invoke("status", "orphan-1", "--json").output)["controller_alive"] is False


def test_rm_and_gc_forget_finished_jobs_and_their_files() -> None:
    from spotrun.clouds.store import open_store

    state = State.open_default()
    store_url = (Path(state.path).parent / "store").as_uri()
    for name in ("old", "new"):
        state.create_job(f"{name}-1", name, {}, store_url, time.time(), None)
        open_store(store_url).put_bytes(f"jobs/{name}-1/job.json", b"{}")
        state.set_job_status(f"{name}-1", JobStatus.SUCCEEDED, time.time(), exit_code=0)
    assert json.loads(invoke("gc", "--older-than", "1h", "--json").output)["removed"] == []
    removed = json.loads(invoke("rm", "old-1", "--json").output)["removed"]
    assert removed == [{"job_id": "old-1", "files_deleted": True}]
    assert open_store(store_url).list("jobs/old-1/") == [] and open_store(store_url).list("jobs/new-1/")
    assert json.loads(invoke("gc", "--older-than", "0s", "--json").output)["removed"][0]["job_id"] == "new-1"
    assert state.jobs(None) == []
    assert invoke("gc", "--older-than", "soon").exit_code == 2


# ---------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("args", [["--help"], ["status"], ["status", "-n", "3", "--label", "a=b"]])
def test_start_up_imports_neither_pydantic_nor_typers_rich_help(args: list[str]) -> None:
    import subprocess
    import sys

    probe = (
        "import json, sys\n"
        "from spotrun.cli.app import main\n"
        f"sys.argv = ['spotrun'] + {args!r}\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('MODULES=' + json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    line = [x for x in proc.stderr.splitlines() if x.startswith("MODULES=")][-1]
    modules = json.loads(line.removeprefix("MODULES="))
    slow = [m for m in modules if m.split(".")[0] == "pydantic" or m in ("typer.rich_utils", "rich.markdown")]
    assert slow == [], f"spotrun {' '.join(args)} imported {slow[:5]}"


def test_market_names_are_never_markup_in_plan_and_launch(tmp_path: Path) -> None:
    env = Env(tmp_path, {})
    spec = env.job("--total 3 --step-time 0.01")
    market = spec.parent / "market.yaml"
    market.write_text(market.read_text().replace("zone: z-a", 'zone: "z-[/x]"'))
    plan = invoke("plan", str(spec))
    assert plan.exit_code == 0, plan.output
    assert "z-[/x]" in plan.output
    launched = invoke("launch", str(spec), "--yes")
    assert launched.exit_code == 0, launched.output
    assert "SUCCEEDED" in launched.output and "z-[/x]" in launched.output


def test_launch_to_a_store_that_cannot_be_written_is_a_clear_exit_2(tmp_path: Path) -> None:
    """A store folder that cannot be created (here: under /proc) is bad input, said in one line, not a traceback."""
    import subprocess
    import sys

    spec = tmp_path / "job.yaml"
    spec.write_text("name: ro\nrun: echo hi\nstore: file:///proc/spotrun-no-store\n")
    env = {**os.environ, "SPOTRUN_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "spotrun", "launch", str(spec), "--yes", "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == 2 and "/proc/spotrun-no-store" in error["message"]


def test_a_cpu_only_offer_reads_no_gpu_in_plan_and_launch(tmp_path: Path) -> None:
    env = Env(tmp_path, {})
    spec = env.job("--total 3 --step-time 0.01")
    market = spec.parent / "market.yaml"
    market.write_text(market.read_text().replace("gpu: A100, gpu_count: 1, gpu_memory_gb: 40, ", ""))
    spec.write_text(spec.read_text().replace('gpu: "A100:1", ', ""))
    plan = invoke("plan", str(spec))
    assert plan.exit_code == 0, plan.output
    assert "None" not in plan.output, plan.output
    launched = invoke("launch", str(spec), "--yes")
    assert launched.exit_code == 0, launched.output
    line = next(x for x in launched.output.splitlines() if x.startswith("plan: "))
    assert "(no GPU)" in line and "None" not in line, line  # was "(0× None)"
