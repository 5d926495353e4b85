"""Where spotrun keeps its files: `SPOTRUN_HOME`, else the platform's user data dir."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    env = os.environ.get("SPOTRUN_HOME")
    if env:
        path = Path(env).expanduser()
    else:
        from platformdirs import user_data_dir

        path = Path(user_data_dir("spotrun", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_db() -> Path:
    return home() / "state.db"


def default_store_dir() -> Path:
    return home() / "store"
