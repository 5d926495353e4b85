"""Human units: what each parser accepts, what it returns, and the exact message when it refuses."""

from __future__ import annotations

import pytest

from spotrun.spec.units import (
    format_duration,
    format_money,
    format_size_gb,
    parse_duration_s,
    parse_hourly_price,
    parse_hours,
    parse_money,
    parse_param_count,
    parse_size_gb,
)


@pytest.mark.parametrize(
    ("given", "gb"),
    [
        ("40GB", 40.0),
        ("40G", 40.0),
        ("40 gb", 40.0),
        ("512MB", 0.512),
        ("512M", 0.512),
        ("1.5TiB", 1649.267441664),
        ("2TB", 2000.0),
        ("16GiB", 17.179869184),
        ("1073741824B", 1.073741824),
        ("1e3MB", 1.0),
        (".5GB", 0.5),
        ("80", 80.0),
        (80, 80.0),
        (0.5, 0.5),
    ],
)
def test_sizes(given: object, gb: float) -> None:
    assert parse_size_gb(given) == pytest.approx(gb)


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("2h30m", 9000.0),
        ("90s", 90.0),
        ("1d", 86400.0),
        ("45m", 2700.0),
        ("1h 30m", 5400.0),
        ("1.5h", 5400.0),
        ("2 hours, 5 min", 7500.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("90", 90.0),
        (90, 90.0),
        (1.5, 1.5),
    ],
)
def test_durations(given: object, seconds: float) -> None:
    assert parse_duration_s(given) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("given", "usd"),
    [("$12.50", 12.5), ("12.5", 12.5), (12.5, 12.5), (3, 3.0), ("$1,250.50", 1250.5), ("40 USD", 40.0)],
)
def test_money(given: object, usd: float) -> None:
    assert parse_money(given) == usd


@pytest.mark.parametrize(("given", "usd"), [("$2.50/h", 2.5), ("2.5 / hr", 2.5), ("$3 per hour", 3.0), (4, 4.0)])
def test_hourly_price(given: object, usd: float) -> None:
    assert parse_hourly_price(given) == usd


@pytest.mark.parametrize(
    ("given", "count"),
    [
        ("7B", 7e9),
        ("350M", 350e6),
        ("1.3e9", 1.3e9),
        ("70 b", 70e9),
        ("125k", 125e3),
        ("1.5 trillion", 1.5e12),
        (7e9, 7e9),
        (350_000_000, 350e6),
    ],
)
def test_param_counts(given: object, count: float) -> None:
    assert parse_param_count(given) == pytest.approx(count)


def test_hours_plain_number_is_hours_and_units_convert() -> None:
    assert parse_hours(10) == 10.0
    assert parse_hours("2.5") == 2.5
    assert parse_hours("90m") == 1.5
    assert parse_hours("2h30m") == 2.5


@pytest.mark.parametrize(
    ("parse", "given", "message"),
    [
        (parse_size_gb, "lots", "invalid size 'lots'; use a number with a unit like 40GB, 512MB or 1.5TiB "
         "(a plain number means GB)"),
        (parse_size_gb, "40GiG", "unknown size unit 'GiG' in '40GiG'; use B, KB, MB, GB, TB (1000-based) or "
         "KiB, MiB, GiB, TiB (1024-based); a plain number means GB"),
        (parse_size_gb, "-3GB", "must not be negative, got '-3GB'"),
        (parse_size_gb, -3, "must not be negative, got -3"),
        (parse_size_gb, True, "expected a size like 40GB, got true"),
        (parse_size_gb, None, "expected a size like 40GB, got null"),
        (parse_size_gb, [40], "expected a size like 40GB, got a list"),
        (parse_size_gb, float("nan"), "expected a finite number, got nan"),
        (parse_duration_s, "soon", "invalid duration 'soon'; use a duration like 2h30m, 90s, 45m or 1d "
         "(a plain number means seconds)"),
        (parse_duration_s, "2h30", "invalid duration '2h30'; use a duration like 2h30m, 90s, 45m or 1d "
         "(a plain number means seconds)"),
        (parse_duration_s, "5 parsecs", "unknown duration unit 'parsecs' in '5 parsecs'; use w, d, h, m, s or "
         "ms (e.g. 2h30m; a plain number means seconds)"),
        (parse_duration_s, "30m2h", "invalid duration '30m2h': give each unit once, largest first (e.g. 2h30m)"),
        (parse_duration_s, "1h1h", "invalid duration '1h1h': give each unit once, largest first (e.g. 2h30m)"),
        (parse_duration_s, "-5m", "must not be negative, got '-5m'"),
        (parse_duration_s, float("inf"), "expected a finite number, got inf"),
        (parse_money, "€5", "only USD amounts are supported, got '€5'; use an amount in USD like $12.50 or 12.5"),
        (parse_money, "cheap", "invalid amount 'cheap'; use an amount in USD like $12.50 or 12.5"),
        (parse_money, "-$3", "must not be negative, got '-$3'"),
        (parse_money, "$-3", "must not be negative, got '$-3'"),
        (parse_money, "$2/h", "invalid amount '$2/h'; use an amount in USD like $12.50 or 12.5"),
        (parse_money, False, "expected an amount in USD like $12.50, got false"),
        (parse_hourly_price, "2 per day", "invalid price '2 per day'; use a price in USD per hour like $2.50, "
         "2.5 or $2.50/h"),
        (parse_param_count, 7, "7 parameters is implausibly few; write 7B for 7 billion or 7M for 7 million"),
        (parse_param_count, "7", "'7' parameters is implausibly few; write 7B for 7 billion or 7M for 7 million"),
        (parse_param_count, "7X", "unknown suffix 'X' in '7X'; use K, M, B or T (e.g. 7B, 350M) or a plain "
         "number like 1.3e9"),
        (parse_param_count, "seven", "invalid parameter count 'seven'; use a parameter count like 7B, 350M or "
         "1.3e9"),
        (parse_param_count, "-7B", "must not be negative, got '-7B'"),
    ],
)  # fmt: skip
def test_refusals_say_what_was_given_and_what_is_allowed(parse: object, given: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse(given)  # type: ignore[operator]
    assert str(caught.value) == message


def test_formatting_round_trips() -> None:
    assert format_duration(5400) == "1h30m"
    assert format_duration(90) == "1m30s"
    assert format_duration(93784) == "1d2h3m4s"
    assert format_duration(0.5) == "0.5s"
    assert parse_duration_s(format_duration(93784)) == 93784
    assert format_money(12.5) == "$12.50"
    assert format_money(1250.5) == "$1,250.50"
    assert format_money(0.0042) == "$0.0042"
    assert parse_money(format_money(1250.5)) == 1250.5
    assert format_size_gb(0.5) == "500MB"
    assert format_size_gb(40) == "40GB"
    assert format_size_gb(1500) == "1.5TB"
    assert parse_size_gb(format_size_gb(1500)) == 1500
