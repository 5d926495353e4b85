"""Provider registry. Each provider module is imported only when it is used (cloud SDKs are slow)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spotrun.providers.base import Provider

PROVIDERS: dict[str, str] = {
    "local": "spotrun.providers.local:LocalProvider",
    "aws": "spotrun.providers.aws:AWSProvider",
    "gcp": "spotrun.providers.gcp:GCPProvider",
    "azure": "spotrun.providers.azure:AzureProvider",
}


def get_provider(name: str, **options: Any) -> Provider:
    try:
        target = PROVIDERS[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(**options)
