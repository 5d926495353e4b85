"""The clouds, one folder each: adding a cloud is adding a folder.

Each `spotrun/clouds/<name>/__init__.py` declares, as plain strings, what the folder provides:

    PROVIDER = "provider:AWSProvider"      # module:class of its Provider (spotrun.clouds.base)
    STORE_SCHEME, STORE = "s3", "store:S3Store"   # optional: its object store and URL scheme
    NOTICE = "notice:AWSNotice"            # optional: its preemption-notice watcher (Agent side)
    SECRETS = "secrets:AWSSecrets"         # optional: its secret store for `${VAR}` env (both sides)

The registry below finds the folders on disk and imports a provider, store or watcher module only
when it is used (cloud SDKs cost 0.2-2 s to import).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spotrun.clouds.base import Provider

# Display order for `check`, `offers` and the like; a folder not listed here comes after these.
_ORDER = ("local", "aws", "gcp", "azure")


@cache
def cloud_names() -> tuple[str, ...]:
    """Every cloud folder under spotrun/clouds/, in display order."""
    found = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.ispkg]
    return tuple(sorted(found, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)))


def _declared(cloud: str, attribute: str) -> str | None:
    module = importlib.import_module(f"{__name__}.{cloud}")
    target = getattr(module, attribute, None)
    return f"{__name__}.{cloud}.{target}" if target else None


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@cache
def _providers() -> dict[str, str]:
    return {c: t for c in cloud_names() if (t := _declared(c, "PROVIDER"))}


@cache
def store_classes() -> dict[str, str]:
    """URL scheme -> "module:Class" of the clouds' object stores (the local store is not listed)."""
    out: dict[str, str] = {}
    for cloud in cloud_names():
        scheme = getattr(importlib.import_module(f"{__name__}.{cloud}"), "STORE_SCHEME", None)
        target = _declared(cloud, "STORE")
        if scheme and target:
            out[scheme] = target
    return out


@cache
def notice_watchers() -> dict[str, str]:
    """Notice kind (= cloud name) -> "module:Class" of its watcher."""
    return {c: t for c in cloud_names() if (t := _declared(c, "NOTICE"))}


@cache
def secret_stores() -> dict[str, str]:
    """Cloud name -> "module:Class" of its secret store (`spotrun.clouds.secrets`)."""
    return {c: t for c in cloud_names() if (t := _declared(c, "SECRETS"))}


def provider_names() -> tuple[str, ...]:
    return tuple(_providers())


def __getattr__(name: str) -> Any:
    if name == "PROVIDERS":
        return _providers()
    raise AttributeError(name)


def remote_clouds() -> tuple[str, ...]:
    """The clouds whose instances are real VMs (they install the Agent package): all but `local`."""
    return tuple(n for n in cloud_names() if n != "local")


def provider_class(name: str) -> type[Provider]:
    try:
        target = _providers()[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(_providers())}") from None
    return _load(target)


def get_provider(name: str, **options: Any) -> Provider:
    return provider_class(name)(**options)


def load_class(target: str) -> Any:
    """The class behind a "module:Class" string from this registry."""
    return _load(target)
