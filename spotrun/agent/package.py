"""The Agent a cloud VM installs: this very spotrun, packed as a pip-installable source archive
and put in the job's store, so a VM runs the same code as the controller that launched it —
whether or not spotrun is on a package index the VM can reach.

The archive holds a generated `pyproject.toml` (name, version, dependencies and extras read from
the installed package's own metadata) and the `spotrun/` package files. It is content-addressed
(`agent/spotrun-<version>-<sha>.tar.gz` at the store's root), so it is uploaded once per code
version and shared by every job in the store. The VM's bootstrap (clouds/vmboot.py) fetches it
over the store's REST API with the VM's own identity, checks its sha256 against the boot record,
unpacks it and puts it on PYTHONPATH (no venv needed). The Agent's side of spotrun runs on Python
3.9 and newer (`requires-python` below says so); `vm-requirements.json` lists, per cloud, the
only dependencies a VM pip-installs from its package index: that cloud's store SDK.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from spotrun import __version__

AGENT_PREFIX = "agent"
SKIPPED = {"__pycache__"}
EXTRAS = ("aws", "gcp", "azure")  # what a VM may need; never the dev or train extras
# Of each cloud's extra, what the Agent imports on a VM (its store client); not the compute SDKs.
VM_PACKAGES = {"aws": ("boto3",), "gcp": ("google-cloud-storage",), "azure": ("azure-storage-blob", "azure-identity")}
VM_PYTHON = ">=3.9"


def _declared() -> list[str]:
    """spotrun's Requires-Dist: from its installed metadata, else (a controller host runs the
    unpacked package from PYTHONPATH, uninstalled) from the package's generated pyproject.toml."""
    try:
        return list(metadata.requires("spotrun") or [])
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        project = tomllib.loads(pyproject.read_text())["project"]
        out = list(project.get("dependencies", []))
        for extra, deps in project.get("optional-dependencies", {}).items():
            out += [f'{dep}; extra == "{extra}"' for dep in deps]
        return out


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    """(core dependencies, {extra: dependencies}) of the installed spotrun."""
    core: list[str] = []
    extras: dict[str, list[str]] = {name: [] for name in EXTRAS}
    for req in _declared():
        spec, _, marker = req.partition(";")
        found = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if not found:
            core.append(spec.strip())
        elif found.group(1) in extras:
            extras[found.group(1)].append(spec.strip())
    return core, extras


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def pyproject_text() -> str:
    core, extras = _requirements()
    lines = [
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        'name = "spotrun"',
        f'version = "{__version__}"',
        f'requires-python = "{VM_PYTHON}"',
        f"dependencies = {_toml_list(core)}",
        "",
        "[project.optional-dependencies]",
        *(f"{name} = {_toml_list(deps)}" for name, deps in extras.items()),
        "",
        "[tool.setuptools.packages.find]",
        'include = ["spotrun*"]',
        "",
        "[tool.setuptools.package-data]",
        'spotrun = ["catalog/data/*", "markets/*.yaml", "py.typed"]',
        "",
    ]
    return "\n".join(lines)


def vm_requirements() -> dict[str, list[str]]:
    """{cloud: pip requirements a VM of that cloud installs}, with the versions spotrun declares."""
    _, extras = _requirements()
    out: dict[str, list[str]] = {}
    for cloud, names in VM_PACKAGES.items():
        wanted = [r for r in extras.get(cloud, []) if re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() in names]
        out[cloud] = sorted(wanted)
    return {**out, **controller_requirements()}


def controller_requirements() -> dict[str, list[str]]:
    """{"controller-<cloud>": requirements} of a controller host (`controller: cloud`): spotrun's
    whole control plane (its core dependencies) and that cloud's extra, for a Python >= 3.11."""
    core, extras = _requirements()
    return {f"controller-{cloud}": sorted(core + extras.get(cloud, [])) for cloud in VM_PACKAGES}


def build(dest: Path | None = None):  # -> spotrun.bundle.Packed
    """Pack the running spotrun as an installable source archive; same code → same sha256."""
    from spotrun.bundle import pack_path

    package = Path(__file__).resolve().parent.parent  # spotrun/
    with tempfile.TemporaryDirectory(prefix="spotrun-agent-") as tmp:
        staging = Path(tmp) / "src"
        shutil.copytree(package, staging / "spotrun", ignore=shutil.ignore_patterns(*SKIPPED, "*.pyc"))
        (staging / "pyproject.toml").write_text(pyproject_text())
        (staging / "vm-requirements.json").write_text(json.dumps(vm_requirements(), indent=1, sort_keys=True))
        return pack_path(staging, dest=dest)


def package_key(sha256: str) -> str:
    return f"{AGENT_PREFIX}/spotrun-{__version__}-{sha256[:16]}.tar.gz"
