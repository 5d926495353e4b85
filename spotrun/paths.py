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
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:  # state, logs, the local store and unpacked bundles live here: the owner's only
        if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
            path.chmod(0o700)
    except OSError:
        pass
    return path


def state_db() -> Path:
    return home() / "state.db"


def default_store_dir() -> Path:
    return home() / "store"
