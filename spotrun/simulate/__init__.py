"""Replay real spot history: trace loaders, the job model, the discrete-event simulator.

Submodules: ``traces`` (loaders), ``model`` (job and market), ``engine`` (the replay,
``simulate_one``), ``offline`` (the perfect-knowledge lower bound), ``sweep`` (grids of
jobs), ``report`` (tables and plots). Importing this package imports none of them.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("simulate_one", "SimResult", "run"):
        from spotrun.simulate import engine

        return getattr(engine, name)
    if name in ("ZoneTrace", "load_trace", "load_traces"):
        from spotrun.simulate import traces

        return getattr(traces, name)
    raise AttributeError(name)
