"""Reading a job's logs back from the Store, across attempts, incrementally (for `logs -f`)."""

from __future__ import annotations

from spotrun.clouds.store import NotFound, Store, StoreError, job_prefix, open_store
from spotrun.control.state import State


class LogReader:
    """Yields (header, text) pairs: a header when a new attempt starts, then its new log chunks."""

    def __init__(self, state: State, job_id: str, *, only_attempt: int | None = None, store: Store | None = None):
        self.state = state
        self.job_id = job_id
        self.only_attempt = only_attempt
        self.store = store or open_store(state.job(job_id).store_url)
        self._stores: dict[str, Store] = {}
        self._seen: dict[int, set[str]] = {}
        self._pending = False

    def poll(self) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        self._pending = False
        prefix = job_prefix(self.job_id)
        for a in self.state.attempts(self.job_id):
            if self.only_attempt is not None and a.n != self.only_attempt:
                continue
            if a.started_at is None:
                continue
            store = self._store_of(a.store_url)
            try:
                keys = store.list(f"{prefix}/attempts/{a.n}/log/")
            except StoreError:  # transient: read it at the next poll
                self._pending = True
                continue
            seen = self._seen.get(a.n)
            if seen is None:
                seen = self._seen[a.n] = set()
                market = "spot" if a.spot else "on-demand"
                header = f"attempt {a.n} · {a.provider}/{a.location} · {a.instance_type} · {market}"
                out.append((header, ""))
            for key in keys:
                if key in seen:
                    continue
                try:
                    text = store.get_bytes(key).decode("utf-8", errors="replace")
                except (NotFound, StoreError):
                    self._pending = True
                    continue
                seen.add(key)
                out.append((None, text))
            if a.ended_at is None:
                self._pending = True
        return out

    def _store_of(self, url: str | None) -> Store:
        """An attempt's store: the job's own unless its cloud keeps its own."""
        if url is None:
            return self.store
        if url not in self._stores:
            self._stores[url] = open_store(url)
        return self._stores[url]

    def drained(self) -> bool:
        """True when the last poll found every attempt ended and nothing left to read."""
        return not self._pending
