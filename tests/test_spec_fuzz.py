"""Spec fuzzer (issue 13): 300+ seeded specs with non-finite numbers in every numeric field,
unit-less sizes and durations, broken market files, FIFOs and huge files. `validate` and `plan`
never print a traceback; whatever `validate` accepts, `plan` plans or refuses with exit 2/3/4;
`plan --json` never prints NaN or Infinity."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spotrun.cli.app import app

pytestmark = pytest.mark.faults

NUMERIC = [
    ("resources", "memory"), ("resources", "disk"), ("resources", "cpus"), ("resources", "max_price"),
    ("checkpoint", "interval"), ("checkpoint", "keep"), ("recovery", "max_restarts"),
    ("recovery", "zone_cooldown"), ("recovery", "max_preemptions"), (None, "budget"), (None, "deadline"),
    ("workload", "model_params"), ("workload", "hours"), ("workload", "checkpoint_gb"), ("workload", "data_gb"),
]  # fmt: skip
BAD_NUMBERS = ["1e309", "1e400s", "1e400GB", ".inf", "-.inf", ".nan", "nan", "inf", "-1", "0", "12", "1e-400",
               "'1e309'", "$1e309", "1e309h", "9" * 400, "0x10", "[1]", "{a: 1}", "null", "true"]  # fmt: skip
GOOD = {"memory": "8GB", "disk": "50GB", "deadline": "12h", "budget": "5", "interval": "10m"}
MARKETS = ["zones: []\n", "zones: [{name: z}]\n", ": : :\n", "\x00\x01", "a: [1, 2\n", "zones: !!python/object x\n",
           "[" * 5000 + "]" * 5000, ""]  # fmt: skip


def _spec(rng: random.Random, tmp: Path, i: int) -> Path:
    sections: dict[str, dict[str, str]] = {"resources": {"gpu": "'A100:1'"}}
    top: dict[str, str] = {"name": f"fz{i}", "run": "python train.py"}
    for section, key in rng.sample(NUMERIC, rng.randint(1, 3)):
        value = GOOD.get(key, "3") if rng.random() < 0.5 else rng.choice(BAD_NUMBERS)
        (top if section is None else sections.setdefault(section, {}))[key] = value
    if rng.random() < 0.25:
        market = tmp / f"market{i}.yaml"
        market.write_text(rng.choice(MARKETS))
        sections["local"] = {"market": str(market)}
    lines = [f"{k}: {v}" for k, v in top.items()]
    for section, values in sections.items():
        lines.append(f"{section}:")
        lines += [f"  {k}: {v}" for k, v in values.items()]
    path = tmp / f"spec{i}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _check(result, allowed: set[int]) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code in allowed, (result.exit_code, result.output[-2000:])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback: {result.exception!r}\n{result.output[-2000:]}")
    assert "Traceback" not in result.output


def test_300_fuzzed_specs_never_crash_validate_or_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTRUN_HOME", str(tmp_path / "home"))
    rng = random.Random(13)
    runner = CliRunner()
    accepted = 0
    for i in range(300):
        path = _spec(rng, tmp_path, i)
        result = runner.invoke(app, ["validate", str(path)])
        _check(result, {0, 2})
        if result.exit_code != 0:
            continue
        accepted += 1
        planned = runner.invoke(app, ["plan", str(path), "--json"])
        _check(planned, {0, 2, 3, 4})
        if planned.exit_code == 0:
            text = planned.output[planned.output.index("{") :]
            json.loads(text, parse_constant=lambda c: pytest.fail(f"plan --json printed {c}"))
    assert accepted >= 20  # the fuzzer also exercises the accepted path


def test_accepted_fuzzed_specs_launch_or_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample of what `validate` accepts, launched for real (`run: "true"`): it runs, or stops
    with 2/3/4; never a traceback after the job was created (cancel/status still work)."""
    monkeypatch.setenv("SPOTRUN_HOME", str(tmp_path / "home"))
    rng = random.Random(1313)
    runner = CliRunner()
    launched = 0
    for i in range(200):
        path = _spec(rng, tmp_path, i)
        path.write_text(path.read_text().replace("run: python train.py", "run: 'true'"))
        if runner.invoke(app, ["validate", str(path)]).exit_code != 0:
            continue
        result = runner.invoke(app, ["launch", str(path), "--yes", "--json"])
        _check(result, {0, 2, 3, 4})
        launched += 1
        if launched == 5:
            break
    assert launched == 5
    status = runner.invoke(app, ["status", "--json"])
    _check(status, {0})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("deadline: 12\n", "did you mean 12h?"),
        ("deadline: '1e400s'\n", "finite"),
        ("budget: '1e309'\n", "finite"),
        ("resources: {memory: '2e308GB'}\n", "finite"),
        ("resources: {regions: [mars-east-1]}\n", "no cloud has a region 'mars-east-1'"),
        ("resources: {zones: [mars-east-1a]}\n", "no cloud has a zone 'mars-east-1a'"),
        ("local: {market: market.yaml}\n", "market.yaml:1"),
    ],
)
def test_bad_input_is_refused_by_validate_with_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "market.yaml").write_text("zones: []\n")
    spec = tmp_path / "job.yaml"
    spec.write_text("name: bad\nrun: python train.py\n" + text)
    result = CliRunner().invoke(app, ["validate", str(spec)])
    _check(result, {2})
    assert expected in " ".join(result.output.split()), result.output


def test_a_fifo_a_device_and_a_huge_file_are_refused_without_hanging(tmp_path: Path) -> None:
    runner = CliRunner()
    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: 64 MB of zeros
    for path in (fifo, Path("/dev/zero"), huge, tmp_path):
        result = runner.invoke(app, ["validate", str(path)])
        _check(result, {2})
