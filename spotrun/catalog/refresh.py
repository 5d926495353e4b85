"""`spotrun catalog refresh`: fresh prices and interruption buckets from the providers' own APIs.

Each cloud's fetcher lives in its folder (`spotrun/clouds/<cloud>/prices.py`, declared by the folder's
`PRICES`): AWS spot price history and Spot Advisor, Azure Retail Prices, GCP Cloud Billing Catalog.

A refresh never invents machine shapes: it re-prices the instance types of the bundled snapshot
(specs and zones come from there) and adds the regions/zones the API reports for them. Each
provider's result is written atomically to `<home>/catalog/<provider>.csv.gz`; a provider whose
fetch fails keeps its previous file, and the result says what failed.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotrun.catalog.http import RefreshError

__all__ = ["RefreshError", "RefreshResult", "refresh"]


@dataclass
class RefreshResult:
    provider: str
    ok: bool
    rows: int = 0
    path: Path | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "ok": self.ok,
            "rows": self.rows,
            "path": str(self.path) if self.path else None,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }


def refresh(
    providers: Iterable[str] | None = None,
    *,
    directory: Path | None = None,
    environ: Mapping[str, str] | None = None,
    today: str | None = None,
) -> list[RefreshResult]:
    """Refresh each provider; write each success atomically, leave each failure's previous file."""
    import importlib

    from spotrun.catalog import PROVIDERS, bundled_offers, cache_dir, refreshed_path
    from spotrun.catalog.snapshot import read_file, write_file
    from spotrun.clouds import cloud_names, load_class

    env = os.environ if environ is None else environ
    day = today or dt.date.today().isoformat()
    directory = directory or cache_dir()
    bundled = bundled_offers()
    results = []
    for provider in providers or PROVIDERS:
        base = [o for o in bundled if o.provider == provider]
        path = refreshed_path(provider, directory)
        result = RefreshResult(provider, ok=False)
        try:
            declared = (
                getattr(importlib.import_module(f"spotrun.clouds.{provider}"), "PRICES", None)
                if provider in cloud_names()
                else None
            )
            if not declared:
                raise RefreshError(f"unknown provider {provider!r}")
            fetch = load_class(f"spotrun.clouds.{provider}.{declared}")
            previous = read_file(path) if path.is_file() else base
            rows, errors, warnings = fetch(base, previous, env, day)
            result.errors += errors
            result.warnings += warnings
            if not rows:
                raise RefreshError(f"{provider}: the API returned no prices for any known GPU instance type")
            result.rows = write_file(path, rows)
            result.path = path
            result.ok = True
        except RefreshError as e:
            result.errors.append(str(e))
        except ImportError as e:
            result.errors.append(f"{provider}: missing package ({e.name}); install spotrun[{provider}]")
        results.append(result)
    return results
