"""How every command writes: consoles sized for where the output goes, JSON, and one error shape.

- A terminal gets rich at the terminal's own width. Piped output gets a console so wide that
  nothing is cut: identifiers are never shortened with '…', and long lines stay whole.
- `--json` output is one JSON document on stdout; an error under `--json` is
  `{"error": {"code": N, "message": "...", "issues": [...]}}` on stdout (and exit code N).
- Text that comes from outside spotrun's own code (event and detail text, exit records, reasons,
  paths) is never read as rich markup: print it with `plain()` / `Text`, or `markup=False`.

Cheap to import: rich's console is imported when a console is first made.
"""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

# README's exit-code contract.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_CAPACITY = 3
EXIT_BUDGET = 4
EXIT_CANCELLED = 130  # also: the launch prompt was declined (nothing was launched)

PIPED_WIDTH = 1000  # wide enough for any row spotrun prints; rich never pads lines to it

_consoles: dict[bool, Console] = {}


def console(stderr: bool = False) -> Console:
    """The stdout (or stderr) console: the terminal's width, or PIPED_WIDTH when not a terminal."""
    if stderr not in _consoles:
        from rich.console import Console

        stream = sys.stderr if stderr else sys.stdout
        tty = stream.isatty()
        _consoles[stderr] = Console(stderr=stderr, width=None if tty else PIPED_WIDTH, highlight=False)
    return _consoles[stderr]


def reset_consoles() -> None:
    """Forget the consoles (the streams changed, e.g. under a test runner)."""
    _consoles.clear()


def is_terminal() -> bool:
    return sys.stdout.isatty()


def plain(text: Any) -> Any:
    """`text` as a rich Text: shown as written, never parsed as markup."""
    from rich.text import Text

    return Text(str(text))


def say(message: str) -> None:
    """A line of text we wrote ourselves (may hold markup); untrusted parts must go through escape()."""
    console().print(message, soft_wrap=True)


def say_plain(message: str, *, stderr: bool = False) -> None:
    """A line holding untrusted text: printed as is, never as markup."""
    console(stderr).print(message, markup=False, highlight=False, soft_wrap=True)


def escape(text: Any) -> str:
    from rich.markup import escape as _escape

    return _escape(str(text))


def print_json(data: Any) -> None:
    """One JSON document on stdout; a non-finite number is written as null (JSON has no NaN)."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def error_json(code: int, message: str, issues: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "issues": issues or []}}


def fail(
    message: str, code: int = EXIT_BAD_INPUT, *, json_out: bool = False, issues: list[dict[str, Any]] | None = None
) -> typer.Exit:
    """Report an error (JSON on stdout under --json, else 'error: …' on stderr); return the Exit to raise."""
    if json_out:
        print_json(error_json(code, message, issues))
    else:
        say_plain(f"error: {message}", stderr=True)
    return typer.Exit(code)


def spec_issues(error: Any) -> list[dict[str, Any]]:
    """A SpecError's problems as JSON-ready dicts."""
    return [
        {"file": i.file, "line": i.line, "column": i.column, "key": i.key_path, "message": i.message}
        for i in getattr(error, "issues", [])
    ]
