"""The controller's part in getting `${VAR}` env values to cloud VMs (see spotrun/clouds/secrets.py).

* `boot_env`: before a launch on a cloud, the values go into that cloud's secret store (a new
  version each launch, so a resumed job with a rotated value passes it on) and the boot record gets
  the reference. A shell that lacks a value may still launch when the store already holds the
  job's secret from an earlier launch: the VM reads what the job was started with. Either way the
  store grants the identity the job's VM will run as (the job's own, which the store makes first
  when the job's store is on that cloud: clouds/{gcp,azure}/identity.py) and no other.
* `delete_secrets`: when the job ends, every cloud it ran on forgets the job's secret.
* `resume_refusal`: `spotrun launch --resume` from a shell that lacks a `${VAR}` is refused (exit 2)
  unless every cloud the job may launch on already holds the job's secret.

Values are taken from the spec the controller rebuilt from State and this process's environment;
they are handed to the secret store client and nothing else: no event, no log line, no State row.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from spotrun.clouds import load_class, secret_stores
from spotrun.clouds.secrets import SECRETS_REF_ENV, SecretsError, encode_ref

if TYPE_CHECKING:
    from spotrun.clouds.base import Provider
    from spotrun.control.state import State
    from spotrun.spec import JobSpec


def missing_variables(stored: dict[str, Any], environ: Any = None) -> list[str]:
    """The `${VAR}`s (without a `:-default`) of the stored spec's env that `environ` lacks."""
    from spotrun.spec.models import _env_refs  # the spec's own parser of `${...}` references

    environ = os.environ if environ is None else environ
    missing: set[str] = set()
    for template in (stored.get("env") or {}).values():
        for ref in _env_refs(str(template)):
            name, sep, _ = ref.partition(":-")
            if not sep and name not in environ:
                missing.add(name)
    return sorted(missing)


def store_for(cloud: str, provider: Provider) -> Any:
    """The cloud's secret store, configured like its provider; None for a cloud without one."""
    target = secret_stores().get(cloud)
    return load_class(target).from_provider(provider) if target else None


def boot_env(
    cloud: str,
    provider: Provider,
    job_id: str,
    spec: JobSpec,
    stored: dict[str, Any],
    *,
    store_url: str = "",
    region: str = "",
) -> dict[str, str]:
    """The boot record's env for a launch on `cloud` in `region` with the job's store at
    `store_url`: the reference to the job's secret (empty for a job without `${VAR}` env). Raises
    SecretsError; a missing value with no stored secret is a permanent one naming the variables."""
    if not spec.secret_env_keys:
        return {}
    try:
        return _boot_env(cloud, provider, job_id, spec, stored, store_url, region)
    except SecretsError:
        raise
    except ImportError as e:  # a cloud extra installed without its secret-store client
        raise SecretsError(f"{cloud}: {e}: reinstall spotrun[{cloud}]", permanent=True) from None
    except Exception as e:  # noqa: BLE001 -- an SDK's own error: try the launch again later
        raise SecretsError(f"{cloud}: the secret store failed: {type(e).__name__}") from None


def _boot_env(
    cloud: str, provider: Provider, job_id: str, spec: JobSpec, stored: dict[str, Any], store_url: str, region: str
) -> dict[str, str]:
    store = store_for(cloud, provider)
    if store is None:
        raise SecretsError(f"{cloud}: no secret store: ${{VAR}} env cannot reach its instances", permanent=True)
    missing = missing_variables(stored)
    if missing:
        ref = store.find(job_id)
        if ref is None:
            names = ", ".join(missing)
            raise SecretsError(f"{names} not set in the controller's environment and no stored copy", permanent=True)
    # A store with `grant` (GCP, Azure) grants the VM's identity on the secret itself; AWS's
    # per-job role is granted in its own policy (clouds/aws/resources.py).
    where = {"store_url": store_url, "region": region} if hasattr(store, "grant") else None
    if missing:
        ref = store.grant(job_id, **where) if where is not None else ref
    else:
        values = {k: spec.env[k] for k in sorted(spec.secret_env_keys)}
        ref = store.put(job_id, values, **(where or {}))
    return {SECRETS_REF_ENV: encode_ref(ref)}


def delete_secrets(state: State, job_id: str, spec: JobSpec, provider_of: Any, now: float) -> None:
    """Delete the job's secret from every cloud it was launched on; failures become events."""
    if not spec.secret_env_keys:
        return
    for cloud in sorted({a.provider for a in state.attempts(job_id)}):
        if cloud not in secret_stores():
            continue
        try:
            deleted = store_for(cloud, provider_of(cloud, spec)).delete(job_id)
        except Exception as e:  # noqa: BLE001 -- SecretsError, or a provider that cannot be built
            state.add_event(job_id, now, "secrets_error", f"{cloud}: the job's secret was not deleted: {e}")
            continue
        if deleted:
            state.add_event(job_id, now, "secrets", f"{cloud}: the job's secret was deleted")


def resume_refusal(state: State, job_id: str) -> str | None:
    """Why `launch --resume JOB` must not go on from this shell, or None when it may."""
    from spotrun.control.specs import allowed_providers, planning_spec, provider_options

    job = state.job(job_id)
    missing = missing_variables(job.spec)
    if not missing or job.status.terminal:
        return None
    names = ", ".join(missing)
    refusal = (
        f"job {job_id} reads {names} from the launching environment, which this shell does not set: "
        f"export {missing[0]}=... and run again"
    )
    spec = planning_spec(job.spec)
    for cloud in allowed_providers(spec):
        if cloud not in secret_stores():
            return refusal  # a local instance inherits the controller's environment: it needs the value
        try:
            from spotrun.clouds import get_provider

            if store_for(cloud, get_provider(cloud, **provider_options(cloud, spec))).find(job_id) is None:
                return refusal + f" ({cloud} holds no copy of the job's secret)"
        except Exception as e:  # noqa: BLE001 -- cannot tell: refuse rather than launch without it
            return refusal + f" ({cloud}: {e})"
    return None
