"""Spec problems as the user sees them: `SpecIssue` (file, line, column, key path, message),
`SpecError` (all of them at once), and the helpers validators use to report several problems or a
problem below their own field, with a "did you mean" for mistyped words."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from spotrun.spec.yamlpos import KeyPath


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec. `line`/`column` are 1-based; None when the file could not be read."""

    file: str
    line: int | None
    column: int | None
    key_path: str  # dotted, e.g. "resources.gpu" or "resources.providers[1]"; "" for the whole file
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.key_path}: {self.message}" if self.key_path else f"{where}: {self.message}"


class SpecError(Exception):
    """A spec that cannot be used; `issues` lists every problem found, in file order."""

    def __init__(self, issues: Iterable[SpecIssue]) -> None:
        unique = dict.fromkeys(issues)
        self.issues: list[SpecIssue] = sorted(unique, key=lambda i: (i.line or 0, i.column or 0, i.key_path, i.message))
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


class _Problems(ValueError):
    """Raised by validators: problems at paths relative to the validated field or model.

    Each item is (relative path, message, at_key); at_key points the position at the mapping key
    rather than at its value (for a bad env var name, say).
    """

    def __init__(self, items: list[tuple[KeyPath, str, bool]]) -> None:
        self.items = items
        super().__init__("; ".join(_join_path(path) + ": " + msg if path else msg for path, msg, _ in items))


def _problem(path: KeyPath, message: str, *, at_key: bool = False) -> _Problems:
    return _Problems([(path, message, at_key)])


def closest_match(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice closest to `word`: same letters in another case, look-alike digits ('A1OO' for
    'A100'), or difflib's best match above `cutoff`; None if nothing is close."""
    by_lower = {choice.lower(): choice for choice in choices}
    low = word.strip().lower()
    if low in by_lower:
        return by_lower[low]
    lookalike = str.maketrans({"o": "0", "l": "1", "i": "1"})
    by_lookalike = {c.translate(lookalike): choice for c, choice in by_lower.items()}
    if low.translate(lookalike) in by_lookalike:
        return by_lookalike[low.translate(lookalike)]
    match = difflib.get_close_matches(low, list(by_lower), n=1, cutoff=cutoff)
    return by_lower[match[0]] if match else None


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    best = closest_match(word, choices)
    return f" (did you mean {best!r}?)" if best and best != word else ""


def _join_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out
