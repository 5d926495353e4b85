"""HTTP for the price refreshers: JSON GETs whose errors are safe to show (no keys, no query strings)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

HTTP_TIMEOUT_S = 30.0
MAX_PAGES = 500  # a runaway NextPageLink loop stops here


class RefreshError(Exception):
    """A fetch that failed; the message is safe to show (no keys, no query strings)."""


def _safe_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def get_json(url: str, headers: Mapping[str, str] | None = None, timeout: float = HTTP_TIMEOUT_S) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only)
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = ""
        try:
            body = json.loads(e.read().decode("utf-8", "replace"))
            err = body.get("error", body) if isinstance(body, dict) else {}
            detail = str(err.get("message") or err.get("Message") or "")[:200] if isinstance(err, dict) else ""
        except (ValueError, OSError):
            pass
        raise RefreshError(f"HTTP {e.code} from {_safe_url(url)}" + (f": {detail}" if detail else "")) from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RefreshError(f"cannot reach {_safe_url(url)}: {reason}") from None
    except ValueError:
        raise RefreshError(f"{_safe_url(url)} did not return JSON") from None
