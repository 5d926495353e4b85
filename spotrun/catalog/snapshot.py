"""Offers on disk: the gzip'd CSV the bundled catalog and the refresh cache are written in.

One header row naming Offer's fields, then one row per offer; an empty cell is None. CSV rather
than JSON because it is half the size gzip'd and parses faster with the standard library. csv,
gzip and tempfile are imported where used: the usual load reads the marshal'd copy and needs none.
"""

from __future__ import annotations

import marshal
import os
import sys
import zlib
from collections.abc import Iterable
from dataclasses import MISSING
from itertools import repeat
from pathlib import Path
from typing import IO

from spotrun.catalog.model import Offer

FIELDS: tuple[str, ...] = tuple(Offer.__dataclass_fields__)


def _opt_float(text: str) -> float | None:
    return float(text) if text else None


# How each column is read back; anything not listed stays a string.
_PARSE = {
    "gpu": lambda s: s or None,
    "gpu_count": int,
    "gpu_memory_gb": float,
    "vcpus": float,
    "memory_gb": float,
    "spot_price": _opt_float,
    "ondemand_price": _opt_float,
    "interruption_rate": float,
    "availability": _opt_float,
}


def write_offers(fh: IO[str], offers: Iterable[Offer]) -> int:
    import csv

    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(FIELDS)
    n = 0
    for offer in offers:
        writer.writerow(["" if (v := getattr(offer, f)) is None else _fmt(v) for f in FIELDS])
        n += 1
    return n


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return repr(round(value, 6)).removesuffix(".0") if value == value else ""
    return str(value)


def read_offers(fh: IO[str]) -> list[Offer]:
    """Parse offers; columns may come in any order, and columns added later to Offer may be missing."""
    import csv

    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        return []
    unknown = [h for h in header if h not in FIELDS]
    if unknown:
        raise ValueError(f"unknown offer columns: {', '.join(unknown)}")
    defaults = {f: Offer.__dataclass_fields__[f].default for f in FIELDS}
    missing = [f for f in FIELDS if f not in header and defaults[f] is MISSING]
    if missing:
        raise ValueError(f"missing offer columns: {', '.join(missing)}")
    rows = list(reader)
    # Convert column by column (map over C-level float where possible), then build each Offer
    # positionally: several times faster than a keyword-argument dict per row.
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(header)
    converted = []
    for f in FIELDS:
        if f not in header:
            converted.append(repeat(defaults[f], len(rows)))
            continue
        column = columns[header.index(f)]
        parse = _PARSE.get(f)
        converted.append(map(parse, column) if parse else column)
    return [Offer(*values) for values in zip(*converted, strict=True)]


def read_file(path: Path) -> list[Offer]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        return read_offers(fh)


def read_file_cached(path: Path, cache: Path | None) -> list[Offer]:
    """`read_file` through a marshal'd copy of the parsed rows kept in the folder `cache`.

    Parsing the CSV is most of the cost of loading the catalog; the copy loads several times
    faster. It is keyed by the source's size and mtime, the Python version and Offer's fields, and
    any problem with it (missing, stale, unwritable folder) just means parsing the CSV.
    """
    if cache is None:
        return read_file(path)
    st = path.stat()
    tag = f"{st.st_size}:{st.st_mtime_ns}:{sys.version_info[:2]}:{marshal.version}:{','.join(FIELDS)}"
    copy = cache / f".parsed-{path.name.split('.')[0]}-{zlib.crc32(str(path).encode()):08x}.marshal"
    try:
        stored_tag, rows = marshal.loads(copy.read_bytes())
        if stored_tag == tag:
            return [Offer(*row) for row in rows]
    except (OSError, ValueError, EOFError, TypeError):
        pass
    offers = read_file(path)
    try:
        import tempfile

        copy.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=copy.name, suffix=".tmp", dir=copy.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(marshal.dumps((tag, [tuple(getattr(o, f) for f in FIELDS) for o in offers])))
        os.replace(tmp, copy)
    except OSError:
        pass
    return offers


def write_file(path: Path, offers: Iterable[Offer]) -> int:
    """Write atomically: a reader never sees half a file, a failed write leaves the old one."""
    import gzip
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.open(raw, "wt", encoding="utf-8", newline="") as fh:
            n = write_offers(fh, offers)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
