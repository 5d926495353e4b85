"""The market: every cloud GPU offer spotrun knows, with prices and interruption rates.

`load_offers()` merges the snapshot bundled with the package (built by scripts/build_catalog.py from
public data, so planning works offline) with what `spotrun catalog refresh` last fetched into
`<SPOTRUN_HOME>/catalog/<provider>.csv.gz`. A refreshed row replaces the bundled rows of the same
(provider, region, instance type): AWS refreshes carry per-zone spot prices where the bundled AWS
rows are per region.

Local-provider offers are not here: they come from the local market file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from spotrun.catalog.model import Offer

PROVIDERS: tuple[str, ...] = ("aws", "gcp", "azure")
BUNDLED = Path(__file__).resolve().parent / "data" / "offers.csv.gz"

# Parsed files, keyed by path and invalidated by (mtime, size): a long-running controller that
# re-plans after every preemption parses each file once, and still sees a refresh.
_parsed: dict[Path, tuple[tuple[int, int], list[Offer]]] = {}

__all__ = ["Offer", "PROVIDERS", "BUNDLED", "cache_dir", "load_offers", "bundled_offers"]


def cache_dir() -> Path:
    """Where refreshed offers are kept: `<SPOTRUN_HOME or user data dir>/catalog/`."""
    from spotrun.paths import home

    return home() / "catalog"


def _read(path: Path, cache: Path | None = None) -> list[Offer]:
    from spotrun.catalog.snapshot import read_file_cached

    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _parsed.get(path)
    if hit and hit[0] == stamp:
        return hit[1]
    offers = read_file_cached(path, cache)
    _parsed[path] = (stamp, offers)
    return offers


def bundled_offers() -> list[Offer]:
    return list(_read(BUNDLED))


def refreshed_path(provider: str, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"{provider}.csv.gz"


def load_offers(providers: Iterable[str] | None = None) -> list[Offer]:
    """Every known cloud offer (bundled snapshot + refreshed cache), optionally for some providers."""
    wanted = set(PROVIDERS if providers is None else providers)
    refreshed: dict[str, list[Offer]] = {}
    directory = cache_dir()
    for provider in wanted:
        path = refreshed_path(provider, directory)
        if path.is_file():
            try:
                refreshed[provider] = _read(path, directory)
            except (OSError, ValueError, EOFError):
                continue  # a damaged cache never hides the bundled snapshot
    out: list[Offer] = []
    covered = {(o.provider, o.region, o.instance_type) for rows in refreshed.values() for o in rows}
    for offer in _read(BUNDLED, directory):
        if offer.provider not in wanted:
            continue
        if covered and (offer.provider, offer.region, offer.instance_type) in covered:
            continue
        out.append(offer)
    for rows in refreshed.values():
        out.extend(rows)
    return out
