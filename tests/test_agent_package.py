"""The Agent a cloud VM installs: this spotrun packed into the job's store, fetched by the VM's
bootstrap with its cloud's CLI, installable by pip."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from spotrun import __version__
from spotrun.agent import package as agent_package
from spotrun.clouds.base import Boot, render_bootstrap_script


def test_the_package_is_deterministic_and_carries_its_metadata() -> None:
    first, second = agent_package.build(), agent_package.build()
    assert first.sha256 == second.sha256
    with tarfile.open(first.path) as tar:
        names = tar.getnames()
        pyproject = tar.extractfile("pyproject.toml").read().decode()  # type: ignore[union-attr]
    assert "spotrun/agent/main.py" in names and "spotrun/catalog/data/offers.csv.gz" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert f'version = "{__version__}"' in pyproject
    assert '"pydantic>=2.6"' in pyproject and 'aws = ["boto3>=1.34"]' in pyproject
    assert "torch" not in pyproject and "pytest" not in pyproject  # never the train or dev extras
    assert agent_package.package_key(first.sha256) == f"agent/spotrun-{__version__}-{first.sha256[:16]}.tar.gz"


def test_pip_installs_it_and_the_agent_imports_from_the_install(tmp_path: Path) -> None:
    packed = agent_package.build()
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*pip, str(target), f"{packed.path}[aws]"], check=True, capture_output=True, timeout=120)
    probe = "import spotrun, spotrun.agent.main, spotrun.catalog; print(spotrun.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip() == str(target / "spotrun" / "__init__.py")


def fetch_with_stub_clis(tmp_path: Path, boot: Boot) -> tuple[int, str]:
    """Run the bootstrap's own `fetch_agent` with stand-ins for aws/gcloud/gsutil/az that log their
    arguments and write the file they were asked for."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    for cli in ("aws", "gcloud", "gsutil", "az"):
        stub = bin_dir / cli
        stub.write_text(
            "#!/bin/bash\n"
            f'echo "{cli} $*" >> {log}\n'
            'for i in "$@"; do last="$i"; done\n'
            'prev=""; for i in "$@"; do [ "$prev" = "-f" ] && last="$i"; prev="$i"; done\n'
            '[[ "$last" == /* ]] && echo agent > "$last"\n'
            "exit 0\n"
        )
        stub.chmod(0o755)
    script = render_bootstrap_script(boot)
    head = script[: script.index("python3 -m venv")]  # everything before the install: exports + fetch_agent
    head = head.replace("trap 'shutdown -h now' EXIT", "").replace("AGENT=/tmp/", f"AGENT={tmp_path}/")
    body = head + 'fetch_agent && test -s "$AGENT"\n'
    proc = subprocess.run(
        ["bash", "-c", body], env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=30
    )
    return proc.returncode, log.read_text() if log.exists() else ""


def boot_for(url: str, extra: str, **env: str) -> Boot:
    return Boot("j", 1, url.rsplit("/agent/", 1)[0], "jobs/j", spotrun_package=url, extra=extra, env=env)


def test_the_bootstrap_fetches_the_package_with_each_clouds_cli(tmp_path: Path) -> None:
    code, calls = fetch_with_stub_clis(tmp_path / "s3", boot_for("s3://bkt/runs/agent/spotrun-x.tar.gz", "aws"))
    assert code == 0 and calls.startswith("aws s3 cp --only-show-errors s3://bkt/runs/agent/spotrun-x.tar.gz ")
    code, calls = fetch_with_stub_clis(tmp_path / "gs", boot_for("gs://bkt/runs/agent/spotrun-x.tar.gz", "gcp"))
    assert code == 0 and calls.startswith("gcloud storage cp gs://bkt/runs/agent/spotrun-x.tar.gz ")
    code, calls = fetch_with_stub_clis(
        tmp_path / "az", boot_for("az://ckpt/runs/agent/spotrun-x.tar.gz", "azure", AZURE_STORAGE_ACCOUNT="acme")
    )
    assert code == 0
    login, download = calls.splitlines()
    assert login == "az login --identity"
    assert "--account-name acme -c ckpt -n runs/agent/spotrun-x.tar.gz -f" in download
    code, calls = fetch_with_stub_clis(tmp_path / "az2", boot_for("az://ckpt@other/agent/spotrun-y.tar.gz", "azure"))
    assert code == 0 and "--account-name other -c ckpt -n agent/spotrun-y.tar.gz -f" in calls


def test_without_a_package_the_bootstrap_falls_back_to_the_index(tmp_path: Path) -> None:
    script = render_bootstrap_script(Boot("j", 1, "s3://b/p", "jobs/j", spotrun_spec="spotrun[aws]==0.1.0"))
    assert "PKG=''" in script and "pip install -q 'spotrun[aws]==0.1.0'" in script
    code, calls = fetch_with_stub_clis(tmp_path, Boot("j", 1, "s3://b/p", "jobs/j"))
    assert code != 0 and calls == ""  # no package: nothing fetched, the else branch installs from the index
