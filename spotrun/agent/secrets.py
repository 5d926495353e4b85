"""The Agent's side of `${VAR}` secrets on a cloud VM: read the job's values from the cloud's secret
store, under the VM's own identity, with the reference the controller put in the boot record's env
(spotrun/clouds/secrets.py). The values stay in the Agent's memory and reach the workload through
its environment only: never the Agent's own environment, a log line, a file or a command line.
Python 3.9.
"""

from __future__ import annotations

from collections.abc import Mapping

from spotrun.clouds import load_class, secret_stores
from spotrun.clouds.secrets import SECRETS_REF_ENV, SecretsError, decode_ref


def fetch_secrets(boot_env: Mapping[str, str], names: list[str]) -> dict[str, str]:
    """The values of `names` (the job's secret env keys); {} when the boot record holds no
    reference (a local instance inherits them instead). Raises SecretsError naming what is missing."""
    text = boot_env.get(SECRETS_REF_ENV)
    if not text:
        return {}
    ref = decode_ref(text)
    target = secret_stores().get(ref["cloud"])
    if target is None:
        raise SecretsError(f"no secret store for cloud {ref['cloud']!r}", permanent=True)
    values = load_class(target).fetch(ref)
    lacking = [n for n in names if n not in values]
    if lacking:
        raise SecretsError(f"the job's secret lacks {', '.join(lacking)}", permanent=True)
    return {n: values[n] for n in names}
