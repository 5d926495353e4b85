"""The house as folders (docs/ARCHITECTURE.md): no import circle, a short top level, every cloud
SDK and every cloud's code under its own `spotrun/clouds/<cloud>/`, and the registry finds them."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spotrun"
SHARED_LEAVES = {"__init__.py", "__main__.py", "clock.py", "paths.py", "pids.py", "bundle.py", "gpus.py", "planner.py"}
SDKS = ("boto3", "botocore", "google", "azure")


def _check_imports():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_no_import_circle() -> None:
    assert _check_imports().cycles(PACKAGE) == []


def test_top_level_holds_packages_and_a_few_shared_leaves() -> None:
    modules = {p.name for p in PACKAGE.glob("*.py")}
    assert modules <= SHARED_LEAVES, f"move these into a package: {sorted(modules - SHARED_LEAVES)}"


def test_cloud_sdks_are_imported_only_inside_their_cloud_folder() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                if root not in SDKS:
                    continue
                cloud = {"boto3": "aws", "botocore": "aws", "google": "gcp", "azure": "azure"}[root]
                if rel.parts[:2] != ("clouds", cloud):
                    offenders.append(f"{rel}: {name}")
    assert offenders == []


def test_each_cloud_folder_is_found_and_declares_what_it_provides() -> None:
    from spotrun import clouds

    assert clouds.cloud_names()[:4] == ("local", "aws", "gcp", "azure")
    assert set(clouds.store_classes()) == {"s3", "gs", "az"}
    assert set(clouds.notice_watchers()) == {"local", "aws", "gcp", "azure"}
    for cloud in clouds.cloud_names():
        folder = PACKAGE / "clouds" / cloud
        assert (folder / "provider.py").is_file() and (folder / "notice.py").is_file()


def test_registry_reads_no_sdk(tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys; from spotrun import clouds; clouds.store_classes(); clouds.notice_watchers(); "
        "clouds.remote_clouds(); bad = [m for m in sys.modules if m.split('.')[0] in "
        f"{SDKS!r}]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
