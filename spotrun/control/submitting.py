"""Submitting a job: pack and upload the code bundle and local data (content-addressed, once), write
the Agent's job file, record the job in State. Launches nothing."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spotrun.clouds.store import Store, StoreError, job_prefix
from spotrun.control.core import ControllerCore
from spotrun.control.specs import checkpoint_env, stored_spec

if TYPE_CHECKING:
    from spotrun.spec import JobSpec


def new_job_id(name: str) -> str:
    return f"{name}-{time.strftime('%m%d')}-{secrets.token_hex(3)}"


class SubmittingMixin(ControllerCore):
    def submit(
        self,
        spec: JobSpec,
        *,
        job_id: str | None = None,
        progress: Callable[[str, int], Callable[[int], None]] | None = None,
    ) -> str:
        """Upload the code bundle, local data and the Agent's job file; record the job. Launches nothing.

        `progress(label, total_bytes)` may return a callback that is fed bytes as they upload.
        """
        from spotrun.agent.jobfile import AgentJob, DataItem
        from spotrun.bundle import pack_dir, pack_path
        from spotrun.paths import default_store_dir

        job_id = job_id or new_job_id(spec.name)
        store_url = self.store_url or spec.store or default_store_dir().as_uri()
        store = self._store(store_url)
        prefix = job_prefix(job_id)

        bundle_key = None
        notes: list[str] = []
        if spec.workdir is not None:
            packed = pack_dir(spec.workdir)
            bundle_key = f"{prefix}/bundle/{packed.sha256}.tar.gz"
            upload_verified(store, bundle_key, packed.path, packed.size, packed.sha256, "code", progress)
            if packed.secrets:
                from spotrun.bundle import secrets_message

                notes.append(secrets_message(packed.secrets))

        data: list[DataItem] = []
        for source, target in spec.data.items():
            if "://" in source:
                data.append(DataItem(source=source, target=target, kind="url"))
                continue
            packed = pack_path(_resolve(spec, source))
            key = f"data/{packed.sha256}.tar.gz"  # store-wide: an unchanged dataset is never sent twice
            upload_verified(store, key, packed.path, packed.size, packed.sha256, f"data {source}", progress)
            data.append(DataItem(source=key, target=target, kind="store"))

        agent_job = AgentJob(
            job_id=job_id,
            name=spec.name,
            bundle=bundle_key,
            setup=spec.setup,
            run=spec.run,
            image=spec.image,
            container_cli=self.options.container_cli,
            container_args=list(self.options.container_args),
            # Secret values never go to the store: the Agent takes them from its own environment.
            env={k: v for k, v in spec.env.items() if k not in spec.secret_env_keys} | checkpoint_env(spec),
            secret_env=sorted(spec.secret_env_keys),
            data=data,
            checkpoint_dir=spec.checkpoint.dir,
            keep=spec.checkpoint.keep,
            upload_budget=self.options.upload_budget,
            heartbeat_interval=self.options.heartbeat_interval,
            log_flush_interval=self.options.log_flush_interval,
        )
        try:
            store.put_bytes(f"{prefix}/job.json", agent_job.to_json().encode())
        except (OSError, StoreError) as e:  # read-only, full, unreachable: say which store
            raise StoreError(f"store {store.url}: cannot write the job file: {type(e).__name__}: {e}") from e
        self.state.create_job(
            job_id,
            spec.name,
            stored_spec(spec),
            store_url,
            self.clock.now(),
            str(spec.source_path) if spec.source_path else None,
        )
        for note in notes:  # shown by `status`: what was left out, and how to include it
            self.state.add_event(job_id, self.clock.now(), "bundle", note)
        self.submit_notes = notes
        return job_id


def _resolve(spec: JobSpec, source: str) -> Any:
    from pathlib import Path

    p = Path(source).expanduser()
    return p if p.is_absolute() else (spec.base_dir / p)


HASH_CHECK_LIMIT = 1 << 30  # bytes: objects up to 1 GiB are re-hashed before an upload is skipped


def same_object(store: Store, key: str, size: int, sha256: str) -> bool:
    """Whether `key` exists and holds exactly these bytes (size, then sha256 of a download):
    a content-addressed key is never trusted by its name alone. Above HASH_CHECK_LIMIT the
    download would cost more than it saves: the size must match, and the Agent's own sha256
    check before use (agent/fetch.py) refuses a swapped object with a reason naming it."""
    import tempfile
    from pathlib import Path

    from spotrun.bundle import sha256_file
    from spotrun.clouds.store import NotFound

    try:
        if not store.exists(key) or store.size(key) != size:
            return False
        if size > HASH_CHECK_LIMIT:
            return True
        with tempfile.TemporaryDirectory(prefix="spotrun-check-") as tmp:
            local = Path(tmp) / "object"
            store.get_file(key, local)
            return sha256_file(local) == sha256
    except (NotFound, StoreError, OSError):
        return False


def upload_verified(
    store: Store,
    key: str,
    path: Any,
    size: int,
    sha256: str,
    label: str,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> None:
    """Upload `path` to the content-addressed `key` unless the store already holds the same bytes."""
    if same_object(store, key, size, sha256):
        return
    callback = progress(label, size) if progress else None
    try:
        store.put_file(key, path, progress=callback)
    except (OSError, StoreError) as e:  # read-only, full, unreachable: say which store
        raise StoreError(f"store {store.url}: cannot upload the {label}: {type(e).__name__}: {e}") from e
