"""Reading a spec: the file (size-capped, any junk refused cleanly), YAML with positions, model
validation, and every problem reported at once as one `SpecError`."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import (
    ValidationError,
)
from yaml.nodes import ScalarNode

from spotrun.spec.issues import SpecError, SpecIssue, _join_path
from spotrun.spec.models import LOADER_FIELDS, JobSpec
from spotrun.spec.report import _issues_from, _unknown_key_message
from spotrun.spec.units import describe
from spotrun.spec.yamlpos import MAX_NODES, KeyPath, Reader, TooBig, node_mark, yaml_problem

MAX_SPEC_BYTES = 1 << 20  # a job spec is a few hundred bytes; anything this big is not one


def load_spec(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> JobSpec:
    """Read and validate a job spec file. Raises SpecError (and nothing else) when it is unusable.

    Relative paths in the spec are resolved against the file's folder; `${VAR}` in `env` values is
    expanded from `environ` (default: os.environ).
    """
    display = os.fspath(path)
    try:
        file = Path(display).expanduser()
        st = os.stat(file)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(display)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever, a device never end
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
            raise SpecError([SpecIssue(display, None, None, "", f"is {kind}, expected a YAML file")])
        with open(file, "rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError([SpecIssue(display, None, None, "", "file not found")]) from None
    except IsADirectoryError:
        raise SpecError([SpecIssue(display, None, None, "", "is a folder, expected a YAML file")]) from None
    except PermissionError:
        raise SpecError([SpecIssue(display, None, None, "", "permission denied")]) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SpecError([SpecIssue(display, None, None, "", f"cannot read the file: {reason}")]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([SpecIssue(display, None, None, "", f"too large for a job spec (over {MAX_SPEC_BYTES} bytes)")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        message = f"not a text file: byte 0x{raw[exc.start]:02x} is not valid UTF-8"
        raise SpecError([SpecIssue(display, line, column, "", message)]) from None
    resolved = file.resolve()
    return _parse(text, display, base_dir=resolved.parent, source_path=resolved, environ=environ)


def parse_spec_text(
    text: str,
    filename: str = "<spec>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> JobSpec:
    """Validate spec text. `filename` is only used in messages; relative paths are resolved against
    `base_dir` (default: the current folder). Raises SpecError."""
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    return _parse(text, filename, base_dir=base, source_path=None, environ=environ)


def _parse(
    text: str, file: str, *, base_dir: Path, source_path: Path | None, environ: Mapping[str, str] | None
) -> JobSpec:
    try:
        return _validate(text, file, base_dir, source_path, environ)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError([SpecIssue(file, 1, 1, "", "the YAML is nested too deeply")]) from None
    except Exception as exc:  # a bug in spotrun: still no traceback for the user, but say what it was
        message = f"internal error while validating the spec ({type(exc).__name__}: {exc}); please report it"
        raise SpecError([SpecIssue(file, None, None, "", message)]) from exc


def _validate(
    text: str, file: str, base_dir: Path, source_path: Path | None, environ: Mapping[str, str] | None
) -> JobSpec:
    if not isinstance(text, str):
        raise SpecError([SpecIssue(file, None, None, "", f"expected text, got {describe(text)}")])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        (line, column), message = yaml_problem(exc, text)
        raise SpecError([SpecIssue(file, line, column, "", message)]) from None
    if root is None:
        raise SpecError([SpecIssue(file, 1, 1, "", "the file is empty; a job spec needs at least 'name' and 'run'")])
    reader = Reader()
    try:
        data = reader.read(root)
    except TooBig:
        raise SpecError(
            [SpecIssue(file, 1, 1, "", f"the YAML expands to more than {MAX_NODES} values (aliases?)")]
        ) from None
    issues: list[tuple[KeyPath, SpecIssue]] = [
        (path, SpecIssue(file, line, column, _join_path(path), message))
        for path, (line, column), message, _ in reader.problems
    ]
    if not isinstance(data, dict):
        if issues:  # the root itself was refused (an unsupported tag): that is the whole story
            raise SpecError(issue for _, issue in issues)
        line, column = node_mark(root)
        issues.append(((), SpecIssue(
            file, line, column, "",
            f"expected a mapping of keys at the top level (like 'name: my-job'), got {describe(data)}",
        )))  # fmt: skip
        raise SpecError(issue for _, issue in issues)

    for key in [k for k in data if k.startswith("x-")]:  # extension keys, e.g. to hold YAML anchors
        del data[key]
    for key in LOADER_FIELDS & set(data):
        line, column = reader.where[(key,)].key or (1, 1)
        issues.append(((key,), SpecIssue(file, line, column, key, _unknown_key_message((), key))))
        del data[key]
    env = data.get("env")
    if isinstance(env, dict):  # env values keep their source text: `VERSION: 1.10` stays '1.10'
        for key, value in env.items():
            node = reader.where[("env", key)].node
            if isinstance(node, ScalarNode) and value is not None and not isinstance(value, str):
                env[key] = node.value

    context = {"base_dir": base_dir, "environ": environ if environ is not None else os.environ}
    try:
        spec = JobSpec.model_validate({**data, "base_dir": base_dir, "source_path": source_path}, context=context)
    except ValidationError as exc:
        suppressed = [path for path, _, _, suppress in reader.problems if suppress]
        issues.extend(
            (path, issue)
            for path, issue in _issues_from(exc, reader, file)
            if not any(path[: len(s)] == s for s in suppressed)
        )
        spec = None
    if issues:
        raise SpecError(issue for _, issue in issues)
    assert spec is not None
    return spec
