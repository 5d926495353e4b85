"""Human units for sizes, durations, money and parameter counts.

Used by the job spec (``memory: 40GB``, ``deadline: 2h30m``, ``budget: $12.50``,
``model_params: 7B``) and by CLI flags (``--max-price``). Every parser takes what YAML or a
command line hands over (a number or a string), returns a plain float in one fixed unit, and raises
``ValueError`` with a message that says what was given and what would have been accepted, so callers
can show it to the user as is.

Fixed units: sizes in GB (10**9 bytes; ``GiB`` and friends are 1024-based and converted), durations
in seconds, money in USD, parameter counts as a plain count.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

__all__ = [
    "describe",
    "format_duration",
    "format_money",
    "format_size_gb",
    "parse_duration_s",
    "parse_hours",
    "parse_hourly_price",
    "parse_money",
    "parse_param_count",
    "parse_size_gb",
]

# A decimal number: "40", "1.5", ".5", "1e9", "1.3e9" (no sign: signs are checked separately so the
# message can say "must not be negative" instead of "not a size").
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"


def describe(value: object) -> str:
    """Render a user-supplied value for an error message, YAML-style (`true`, `null`, `'text'`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return repr(text)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple | set):
        return "a list"
    return f"a {type(value).__name__}"


def _number(value: object, what: str, example: str) -> float | None:
    """A float for int/float input (rejecting bools, NaN, infinities, negatives); None for strings."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {what} like {example}, got {describe(value)}")
    if isinstance(value, str):
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {describe(value)}")
    if number < 0:
        raise ValueError(f"must not be negative, got {describe(value)}")
    return number


def _finite(parse: Callable[[object], float]) -> Callable[[object], float]:
    """Every parser's result is a finite number, whatever form it came in: '1e309', '1e400s' and
    '2e308GB' overflow to infinity in float() and are refused here."""

    @functools.wraps(parse)
    def check(value: object) -> float:
        result = parse(value)
        if not math.isfinite(result):
            raise ValueError(f"expected a finite number, got {describe(value)} (too large)")
        return result

    return check


def has_no_unit(value: object) -> bool:
    """A plain number (or a string holding only one): a size or duration written without its unit."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, str) and re.fullmatch(rf"-?{_NUM}", value.strip()) is not None


def _negative(text: str, value: object) -> None:
    if text.startswith("-"):
        raise ValueError(f"must not be negative, got {describe(value)}")


# ------------------------------------------------------------------------------------------- sizes

_SIZE_UNITS: dict[str, float] = {
    "": 1.0,  # a plain number means GB
    "b": 1e-9,
    "k": 1e-6, "kb": 1e-6,
    "m": 1e-3, "mb": 1e-3,
    "g": 1.0, "gb": 1.0,
    "t": 1e3, "tb": 1e3,
    "p": 1e6, "pb": 1e6,
    "ki": 2**10 / 1e9, "kib": 2**10 / 1e9,
    "mi": 2**20 / 1e9, "mib": 2**20 / 1e9,
    "gi": 2**30 / 1e9, "gib": 2**30 / 1e9,
    "ti": 2**40 / 1e9, "tib": 2**40 / 1e9,
    "pi": 2**50 / 1e9, "pib": 2**50 / 1e9,
}  # fmt: skip
_SIZE_HELP = "use a number with a unit like 40GB, 512MB or 1.5TiB (a plain number means GB)"


@_finite
def parse_size_gb(value: object) -> float:
    """'40GB', '40G', '512MB', '1.5TiB', 40 -> GB (10**9 bytes) as a float."""
    number = _number(value, "a size", "40GB")
    if number is not None:
        return number
    assert isinstance(value, str)
    text = value.strip()
    _negative(text, value)
    match = re.fullmatch(rf"({_NUM})\s*([A-Za-z]*)", text)
    if not match:
        raise ValueError(f"invalid size {describe(value)}; {_SIZE_HELP}")
    unit = match.group(2).lower()
    if unit not in _SIZE_UNITS:
        raise ValueError(
            f"unknown size unit {match.group(2)!r} in {describe(value)}; use B, KB, MB, GB, TB "
            "(1000-based) or KiB, MiB, GiB, TiB (1024-based); a plain number means GB"
        )
    return round(float(match.group(1)) * _SIZE_UNITS[unit], 9)  # to the byte: no 1649.2674416640002


def format_size_gb(gb: float) -> str:
    """12.0 -> '12GB', 0.5 -> '500MB', 1500 -> '1.5TB'."""
    if gb >= 1000:
        return f"{gb / 1000:g}TB"
    if gb < 1:
        return f"{gb * 1000:g}MB"
    return f"{gb:g}GB"


# --------------------------------------------------------------------------------------- durations

_DURATION_UNITS: dict[str, float] = {}
for _names, _seconds in (
    (("w", "wk", "wks", "week", "weeks"), 604800.0),
    (("d", "day", "days"), 86400.0),
    (("h", "hr", "hrs", "hour", "hours"), 3600.0),
    (("m", "min", "mins", "minute", "minutes"), 60.0),
    (("s", "sec", "secs", "second", "seconds"), 1.0),
    (("ms", "msec", "millisecond", "milliseconds"), 0.001),
):
    for _name in _names:
        _DURATION_UNITS[_name] = _seconds
_DURATION_HELP = "use a duration like 2h30m, 90s, 45m or 1d (a plain number means seconds)"


@_finite
def parse_duration_s(value: object) -> float:
    """'2h30m', '90s', '1d', '45m', '1h 30m', '1.5h', 90 -> seconds as a float."""
    number = _number(value, "a duration", "2h30m")
    if number is not None:
        return number
    assert isinstance(value, str)
    text = value.strip()
    _negative(text, value)
    if re.fullmatch(_NUM, text):
        return float(text)
    if not re.fullmatch(rf"(?:{_NUM}\s*[A-Za-z]+[\s,]*)+", text):
        raise ValueError(f"invalid duration {describe(value)}; {_DURATION_HELP}")
    total = 0.0
    previous = math.inf
    for amount, unit in re.findall(rf"({_NUM})\s*([A-Za-z]+)", text):
        seconds = _DURATION_UNITS.get(unit.lower())
        if seconds is None:
            raise ValueError(
                f"unknown duration unit {unit!r} in {describe(value)}; use w, d, h, m, s or ms "
                "(e.g. 2h30m; a plain number means seconds)"
            )
        if seconds >= previous:
            raise ValueError(f"invalid duration {describe(value)}: give each unit once, largest first (e.g. 2h30m)")
        previous = seconds
        total += float(amount) * seconds
    return total


@_finite
def parse_hours(value: object) -> float:
    """A runtime in hours: a plain number is hours; a string with units ('90m', '2h30m') is converted."""
    number = _number(value, "a number of hours", "10 or 2h30m")
    if number is not None:
        return number
    assert isinstance(value, str)
    text = value.strip()
    if re.fullmatch(_NUM, text):
        return float(text)
    return parse_duration_s(value) / 3600.0


def format_duration(seconds: float) -> str:
    """5400 -> '1h30m', 90 -> '1m30s', 0.5 -> '0.5s', 93784 -> '1d2h3m4s'."""
    if seconds < 60:
        return f"{seconds:g}s"
    rest = int(round(seconds))
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)


# ------------------------------------------------------------------------------------------- money

_MONEY_HELP = "use an amount in USD like $12.50 or 12.5"


def _parse_usd(value: object, *, per_hour: bool) -> float:
    example = "$2.50/h" if per_hour else "$12.50"
    what = "a price per hour in USD" if per_hour else "an amount in USD"
    number = _number(value, what, example)
    if number is not None:
        return number
    assert isinstance(value, str)
    text = value.strip()
    if per_hour:
        text = re.sub(r"\s*(/\s*(h|hr|hour)|per\s+hour)$", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s*usd$", "", text, flags=re.IGNORECASE)
    text = re.sub(r"^usd\s*", "", text, flags=re.IGNORECASE)
    _negative(text, value)
    if text.startswith("$"):
        text = text[1:].strip()
    _negative(text, value)
    # Thousands separators: "1,250.50".
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d*)?", text):
        text = text.replace(",", "")
    if not re.fullmatch(_NUM, text):
        if re.match(r"[€£¥]", text):
            raise ValueError(f"only USD amounts are supported, got {describe(value)}; {_MONEY_HELP}")
        help_text = "use a price in USD per hour like $2.50, 2.5 or $2.50/h" if per_hour else _MONEY_HELP
        raise ValueError(f"invalid {'price' if per_hour else 'amount'} {describe(value)}; {help_text}")
    return float(text)


@_finite
def parse_money(value: object) -> float:
    """'$12.50', '12.5', '$1,200', '40 USD', 12.5 -> USD as a float."""
    return _parse_usd(value, per_hour=False)


@_finite
def parse_hourly_price(value: object) -> float:
    """Like parse_money, also accepting a per-hour suffix: '$2.50/h', '2.5/hr', '$3 per hour'."""
    return _parse_usd(value, per_hour=True)


def format_money(usd: float) -> str:
    """12.5 -> '$12.50', 0.0042 -> '$0.0042'."""
    if usd != 0 and abs(usd) < 0.01:
        return f"${usd:.4f}"
    return f"${usd:,.2f}"


# -------------------------------------------------------------------------------- parameter counts

_COUNT_SUFFIX: dict[str, float] = {
    "": 1.0,
    "k": 1e3, "thousand": 1e3,
    "m": 1e6, "million": 1e6,
    "b": 1e9, "billion": 1e9,
    "t": 1e12, "trillion": 1e12,
}  # fmt: skip
_COUNT_HELP = "use a parameter count like 7B, 350M or 1.3e9"


@_finite
def parse_param_count(value: object) -> float:
    """'7B', '350M', '1.3e9', '70 b', 7e9 -> number of parameters as a float.

    A bare number below 1000 is refused: `model_params: 7` almost always means 7B, and silently
    planning for a 7-parameter model would pick the smallest GPU there is.
    """
    number = _number(value, "a parameter count", "7B")
    text = "" if number is not None else str(value).strip()
    if number is None:
        _negative(text, value)
        match = re.fullmatch(rf"({_NUM})\s*([A-Za-z]*)", text)
        if not match:
            raise ValueError(f"invalid parameter count {describe(value)}; {_COUNT_HELP}")
        suffix = match.group(2).lower()
        if suffix not in _COUNT_SUFFIX:
            raise ValueError(
                f"unknown suffix {match.group(2)!r} in {describe(value)}; use K, M, B or T "
                "(e.g. 7B, 350M) or a plain number like 1.3e9"
            )
        number = float(match.group(1)) * _COUNT_SUFFIX[suffix]
        if suffix:
            return number
    if number < 1000:
        shown = f"{number:g}"
        raise ValueError(
            f"{describe(value)} parameters is implausibly few; write {shown}B for {shown} billion "
            f"or {shown}M for {shown} million"
        )
    return number
