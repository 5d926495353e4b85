"""README's "Your training script" snippet is real: extracted and run as a script (CPU, seconds),
it trains to the end; interrupted by SIGTERM and run again, it resumes and ends the same."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers_train import ROOT, child_env

from spotrun.checkpoint import EXIT_PREEMPTED


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your training script") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section should hold exactly one python snippet"
    return blocks[0]


def run(script: Path, ck: Path, *, term_at: int | None = None) -> subprocess.CompletedProcess[str]:
    source = script.read_text()
    if term_at is not None:  # a real SIGTERM to the whole group (workers too) right after that step
        source = source.replace(
            "        step += 1\n",
            f"        step += 1\n        if step == {term_at}:\n"
            "            import os, signal\n            os.killpg(0, signal.SIGTERM)\n",
        )
        assert "killpg" in source
    source += "\nfrom spotrun.checkpoint import state_hash\nprint('WEIGHTS', state_hash(model), state_hash(ema))\n"
    path = script.with_name(f"run_{term_at}.py")
    path.write_text(source)
    return subprocess.run(
        [sys.executable, str(path)],
        env=child_env(ck),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=script.parent,
        start_new_session=True,
    )


def test_the_readme_snippet_runs_and_resumes_exactly(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(readme_snippet())
    whole = run(script, tmp_path / "ck-whole")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert whole.stdout.startswith("done 100 "), whole.stdout

    first = run(script, tmp_path / "ck", term_at=37)
    assert first.returncode == EXIT_PREEMPTED, first.stdout + first.stderr
    assert (tmp_path / "ck" / f"{37:012d}").is_dir()
    second = run(script, tmp_path / "ck")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "WEIGHTS " in whole.stdout
    assert second.stdout == whole.stdout  # same model and EMA weights (sha256 of every bit), same best loss
