"""Start-up: plain str/int/float/bool/Path options coerced without pydantic.

typer (0.29) coerces every non-flag parameter through a pydantic TypeAdapter, which imports
pydantic and builds a schema on every command run: about 130 ms of CPU, four times a bare
`python -c pass`, before `spotrun status` reads one row. The parameters spotrun declares are
plain `str`, `int`, `float`, `bool` and `Path` values (or lists of them, or with `min`/`max`), which need
no schema: this module gives typer a light coercer for exactly those and leaves everything else
(enums, files, paths with checks, parsers) to typer's own. When typer's internals are not the
ones expected (another version), `install()` changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

_SIMPLE = (str, int, float, Path, bool)
_TRUE, _FALSE = {"1", "true", "yes", "y", "on", "t"}, {"0", "false", "no", "n", "off", "f"}
_PATH_CHECKS = ("exists", "writable", "resolve_path", "allow_dash", "path_type")


def _light_type(descriptor: Any) -> tuple[type, bool] | None:
    """(element type, is list) when the parameter is one this module can coerce, else None."""
    info = descriptor.parameter_info
    if getattr(descriptor, "file_annotation", None) is not None:
        return None
    if getattr(info, "parser", None) is not None or getattr(info, "click_type", None) is not None:
        return None
    annotation = descriptor.annotation
    many = get_origin(annotation) is list
    if many:
        args = get_args(annotation)
        if len(args) != 1:
            return None
        annotation = args[0]
    if annotation not in _SIMPLE:
        return None
    if annotation is Path and any(getattr(info, name, None) for name in _PATH_CHECKS):
        return None
    if getattr(info, "clamp", False):
        return None
    return annotation, many


def install() -> None:
    """Teach typer's parameters to use the light coercer where it fits (no-op on other typers)."""
    try:
        from typer import core
        from typer._click.exceptions import BadParameter
        from typer._coercion import RuntimeParam
    except ImportError:
        return
    parameter = getattr(core, "_TyperParameter", None)
    original = getattr(parameter, "get_runtime_param", None)
    if parameter is None or original is None or getattr(original, "_spotrun_light", False):
        return

    @dataclass(frozen=True)
    class LightParam(RuntimeParam):  # type: ignore[misc]
        kind: type
        many: bool

        def _one(self, value: Any, param: Any, ctx: Any) -> Any:
            if self.kind is bool:
                text = str(value).strip().lower()
                if isinstance(value, bool) or text in _TRUE | _FALSE:
                    return value if isinstance(value, bool) else text in _TRUE
                raise BadParameter(f"{value!r} is not a valid boolean.", ctx=ctx, param=param)
            if isinstance(value, self.kind) and not isinstance(value, bool):
                out = value
            else:
                try:
                    if self.kind is int and isinstance(value, str):
                        out = int(value.strip())
                    else:
                        out = self.kind(value)
                except (TypeError, ValueError):
                    name = {int: "an integer", float: "a number", str: "text", Path: "a path"}[self.kind]
                    raise BadParameter(f"{value!r} is not {name}.", ctx=ctx, param=param) from None
            low = getattr(self.parameter_info, "min", None)
            high = getattr(self.parameter_info, "max", None)
            if low is not None and out < low:
                raise BadParameter(f"Input should be greater than or equal to {low}", ctx=ctx, param=param)
            if high is not None and out > high:
                raise BadParameter(f"Input should be less than or equal to {high}", ctx=ctx, param=param)
            return out

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if self.many:
                return [self._one(v, param, ctx) for v in value]
            return self._one(value, param, ctx)

    def get_runtime_param(self: Any) -> Any:
        if self._runtime_param is None:
            light = _light_type(self.type_descriptor)
            if light is not None:
                self._runtime_param = LightParam(
                    parameter_info=self.type_descriptor.parameter_info,
                    annotation=self.type_descriptor.annotation,
                    kind=light[0],
                    many=light[1],
                )
        return original(self)

    get_runtime_param._spotrun_light = True  # type: ignore[attr-defined]
    parameter.get_runtime_param = get_runtime_param
