"""Shared fixtures. Every test gets its own SPOTRUN_HOME, so no test sees another's state."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def spotrun_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("spotrun-home")
    monkeypatch.setenv("SPOTRUN_HOME", str(home))
    return home
