"""The job's spec as the controller uses it: rebuilt from State, the providers it allows, each
provider's constructor options and store, and the settings passed on to the workload."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from spotrun.clouds import remote_clouds

if TYPE_CHECKING:
    from spotrun.spec import JobSpec


def allowed_providers(spec: JobSpec) -> list[str]:
    """The spec's providers, or `local` when it names none (the default when no cloud is configured)."""
    return list(spec.resources.providers or ["local"])


def store_for(provider: str, spec: JobSpec, default: str) -> str:
    """The store a provider's instances use: its spec section's `store`, else the job's."""
    section = getattr(spec, provider, None) if provider in remote_clouds() else None
    return getattr(section, "store", None) or default


def provider_options(name: str, spec: JobSpec) -> dict[str, Any]:
    """Constructor options for a provider, from the spec (each cloud's `options_from_spec`)."""
    from spotrun.clouds import provider_class

    return provider_class(name).options_from_spec(spec)


def checkpoint_env(spec: JobSpec) -> dict[str, str]:
    """The spec's checkpoint settings, for the checkpoint library's defaults (SPOTRUN_CHECKPOINT_*)."""
    env = {"SPOTRUN_CHECKPOINT_KEEP": str(spec.checkpoint.keep)}
    if spec.checkpoint.interval is not None:
        env["SPOTRUN_CHECKPOINT_INTERVAL"] = f"{spec.checkpoint.interval:g}"
    return env


def stored_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as kept in State: JSON holding no secret value (`${VAR}` env stays a template)."""
    return spec.persistable()


class _AnyVariable(Mapping[str, str]):
    """The environment, where every variable exists (unset ones are empty): lets a job be
    cleaned up or planned from a shell that lacks its `${SECRET}`s."""

    def __getitem__(self, key: str) -> str:
        return os.environ.get(key, "")

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(os.environ)

    def __len__(self) -> int:
        return len(os.environ)


def planning_spec(data: dict[str, Any]) -> JobSpec:
    """Rebuild the spec from State for planning and limits. The code and data were shipped to the
    Store at submit time; local paths are not re-checked (they may be gone by now). A secret that
    this shell does not have is left empty rather than stopping a cancel or a resume."""
    from spotrun.spec import JobSpec, SpecError

    try:
        return JobSpec.from_persisted(data)
    except SpecError:
        pass
    data = dict(data)
    for _ in range(8):  # a spec saved by an older spotrun that this one refuses: drop what it refuses
        try:
            return JobSpec.from_persisted(data, environ=_AnyVariable())
        except SpecError as e:
            keys = {issue.key_path.split("[")[0] for issue in e.issues if issue.key_path}
            if not keys:
                raise
            for key in keys:
                _drop(data, key.split("."))
    return JobSpec.from_persisted(data, environ=_AnyVariable())


def _drop(data: dict[str, Any], path: list[str]) -> None:
    """Remove `a.b.c` from nested dicts (a field an old saved spec holds and this spotrun refuses),
    so the job can still be cancelled, resumed and shown; its default applies instead."""
    node: Any = data
    for part in path[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        node[part] = dict(node[part]) if isinstance(node[part], dict) else node[part]
        node = node[part]
    if isinstance(node, dict):
        node.pop(path[-1], None)
