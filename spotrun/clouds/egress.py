"""`spotrun check`'s shape for what a VM would lack: each provider's `check()` returns
{"provider", "usable", "detail", "missing": [str, ...]}, `usable` False once anything is missing.
Each cloud's `network.py` says what egress lacks (`egress_missing`); this adds it to the result."""

from __future__ import annotations

from typing import Any


def add_missing(result: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Record `items` as missing in a check result: not usable, and the detail names them."""
    missing = result.setdefault("missing", [])
    missing.extend(items)
    if missing:
        result["usable"] = False
    if items:
        result["detail"] = "; ".join([str(result.get("detail", "")), *items]).lstrip("; ")
    return result
