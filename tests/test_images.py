"""The image table (spotrun/clouds/images.py): every GPU offer of the bundled catalog maps to an
image whose driver supports it, or is excluded with its reason; the planner drops the excluded
ones; each provider boots the row's image; docs/providers shows the same table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from spotrun.catalog import bundled_offers
from spotrun.catalog.model import Offer
from spotrun.clouds.aws.images import OSS_X86, PROPRIETARY_X86, ami_choice
from spotrun.clouds.base import BadRequest
from spotrun.clouds.images import EXCLUDED, choose, exclusion, markdown_table, row_for, rows
from spotrun.gpus import GPU_MODELS
from spotrun.planner import plan
from spotrun.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
CLOUDS = ("aws", "gcp", "azure")


def _gpu_offers() -> list[Offer]:
    return [o for o in bundled_offers() if o.gpu and o.gpu_count > 0]


def test_every_gpu_offer_in_the_catalog_maps_to_a_row_with_a_driver_or_a_reason() -> None:
    uncovered: set[str] = set()
    counted = {"image": 0, "excluded": 0}
    for offer in _gpu_offers():
        row = row_for(offer)
        if row is None:
            uncovered.add(f"{offer.provider} {offer.instance_type} {offer.gpu}")
            continue
        if row.image is None:
            assert row.excluded and row.source, row
            assert exclusion(offer) == row.excluded
            counted["excluded"] += 1
        else:
            assert row.driver and row.source and row.tested, row
            assert exclusion(offer) is None and choose(offer) is row
            counted["image"] += 1
    assert not uncovered, f"add these to the image table (spotrun/clouds/<cloud>/images.py): {sorted(uncovered)}"
    assert counted["image"] > 1000 and counted["excluded"] > 100  # the catalog has both kinds


def test_the_known_hard_cases_are_handled_as_the_vendors_document() -> None:
    by_type = {(o.provider, o.instance_type): o for o in _gpu_offers()}

    def first(provider: str, prefix: str) -> Offer:
        return next(o for (p, t), o in sorted(by_type.items()) if p == provider and t.startswith(prefix))

    assert "R470" in (exclusion(first("aws", "p2.")) or "")  # K80: no current DLAMI driver
    assert choose(first("aws", "p3.")).image == PROPRIETARY_X86  # V100: the proprietary driver
    assert choose(first("aws", "g3.4")).image == PROPRIETARY_X86  # M60 too
    assert exclusion(first("aws", "g3.16xlarge")) is not None  # ... except the one size it does not support
    assert choose(first("aws", "g5.")).image == OSS_X86
    assert "GRID" in (exclusion(first("azure", "Standard_NV")) or "")
    assert "Volta" in (exclusion(first("azure", "Standard_NC6s_v3")) or "")
    assert "AMD" in (exclusion(first("azure", "Standard_ND96isr_MI300X")) or "")
    assert "nvidia-570" in (choose(first("gcp", "a4-")).image or "")  # Blackwell needs R570+
    assert "cu124" in (choose(first("gcp", "n1-")).image or "")
    for offer in _gpu_offers():  # no AMD GPU is ever given an NVIDIA image
        if GPU_MODELS[offer.gpu or ""].vendor == "AMD":
            assert exclusion(offer) is not None, offer


def _spec(tmp_path: Path, extra: str = "") -> Any:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: img\nresources:\n  gpu: K80\n  providers: [aws]\nrun: python train.py\n{extra}")
    return load_spec(path)


def test_the_planner_drops_excluded_offers_unless_the_spec_names_its_own_image(tmp_path: Path) -> None:
    offers = [o for o in _gpu_offers() if o.provider == "aws" and o.gpu == "K80" and o.gpu_count == 1]
    assert offers
    dropped = plan(_spec(tmp_path), offers)
    assert dropped.candidates == [] and dropped.rejected == {EXCLUDED: len(offers)}
    own = plan(_spec(tmp_path, "aws:\n  ami: ami-0123456789abcdef0\n"), offers)
    assert own.candidates and EXCLUDED not in own.rejected


def test_ami_choice_follows_the_row_and_refuses_an_excluded_offer() -> None:
    v100 = Offer("aws", "us-east-1", "us-east-1a", "p3.2xlarge", "V100", 1, 16, 8, 61, 0.9, 3.06, 0.05)
    assert ami_choice(v100, OSS_X86)["parameter"] == PROPRIETARY_X86
    assert ami_choice(replace(v100, instance_type="g4dn.xlarge", gpu="T4"), OSS_X86)["parameter"] == OSS_X86
    arm = ami_choice(replace(v100, instance_type="g5g.xlarge", gpu="T4"), OSS_X86)
    assert arm["arch"] == "arm64" and "/arm64/" in arm["parameter"]
    k80 = replace(v100, instance_type="p2.xlarge", gpu="K80")
    with pytest.raises(BadRequest, match="R470"):
        ami_choice(k80, OSS_X86)
    assert ami_choice(k80, OSS_X86, custom_ami=True) == {"parameter": OSS_X86}  # the user's image, the user's driver


def test_gcp_and_azure_boot_the_rows_image(tmp_path: Path) -> None:
    from spotrun.clouds.azure.images import UBUNTU_HPC
    from spotrun.clouds.azure.images import image_for as azure_image
    from spotrun.clouds.gcp.images import DLVM_CU124, DLVM_CU128
    from spotrun.clouds.gcp.images import image_for as gcp_image

    b200 = Offer("gcp", "us-central1", "us-central1-b", "a4-highgpu-8g", "B200", 8, 180, 224, 3968, 30.0, 90.0, 0.1)
    assert gcp_image(b200, DLVM_CU124) == DLVM_CU128
    assert gcp_image(b200, "projects/mine/global/images/custom") == "projects/mine/global/images/custom"
    v100 = Offer("azure", "eastus", "", "Standard_NC6s_v3", "V100", 1, 16, 6, 112, 0.3, 3.06, 0.05)
    with pytest.raises(BadRequest, match="Volta"):
        azure_image(v100, UBUNTU_HPC)
    t4 = replace(v100, instance_type="Standard_NC4as_T4_v3", gpu="T4")
    assert azure_image(t4, UBUNTU_HPC) == UBUNTU_HPC


@pytest.mark.parametrize("cloud", CLOUDS)
def test_docs_show_the_same_table(cloud: str) -> None:
    assert rows(cloud)
    text = (ROOT / "docs" / "providers" / f"{cloud}.md").read_text()
    assert markdown_table(cloud) in text, f"docs/providers/{cloud}.md: paste markdown_table({cloud!r})"
