"""Azure rows of the image table (spotrun/clouds/images.py): which image boots which N-series
size. spotrun boots Microsoft's Ubuntu HPC image (NVIDIA driver preinstalled as the open kernel
modules, CUDA) and installs no VM extension, so sizes needing another driver are excluded."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spotrun.clouds.images import ImageRow

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer

UBUNTU_HPC = "microsoft-dsvm:ubuntu-hpc:2204:latest"

_HPC = (
    "learn.microsoft.com/azure/virtual-machines/linux/n-series-driver-setup and the Ubuntu HPC image notes "
    "(github.com/Azure/azhpc-images: NVIDIA driver as open kernel modules, CUDA 12)"
)
_EXTENSION = (
    "github.com/Azure/azhpc-extensions NvidiaGPU/Nvidia-GPU-Linux-Resources.json "
    "(DefaultSelectionsPerVMFamily: NCv3 CUDA, NVv3 GRID, NVadsA10_v5 GRID); Azure/AgentBaker #7986: "
    "'converged GPU sizes (NVads_A10_v5, NCads_A10_v4) require NVIDIA GRID vGPU guest drivers'"
)
DEFAULT = UBUNTU_HPC  # the provider's default image

ROWS: tuple[ImageRow, ...] = (
    ImageRow(
        "azure",
        ("T4", "A100", "H100", "H200"),
        (
            "Standard_NC4as_T4",
            "Standard_NC8as_T4",
            "Standard_NC16as_T4",
            "Standard_NC64as_T4",
            "Standard_NC24ads_A100",
            "Standard_NC48ads_A100",
            "Standard_NC96ads_A100",
            "Standard_ND96asr_v4",
            "Standard_ND96amsr_A100",
            "Standard_NC40ads_H100",
            "Standard_NC80adis_H100",
            "Standard_ND96isr_H100",
            "Standard_ND96isr_H200",
        ),
        "x86_64",
        UBUNTU_HPC,
        "NVIDIA open kernel modules (preinstalled), CUDA 12",
        _HPC,
    ),  # fmt: skip
    ImageRow(
        "azure",
        ("H100",),
        ("Standard_NCC",),
        "x86_64",
        None,
        "",
        "learn.microsoft.com/azure/confidential-computing "
        "(NCCadsH100v5: confidential VMs need a confidential-VM image and security profile)",
        excluded="confidential-computing size: needs a confidential-VM image spotrun does not boot",
    ),  # fmt: skip
    ImageRow(
        "azure",
        ("V100",),
        ("Standard_NC6s_v3", "Standard_NC12s_v3", "Standard_NC24s_v3", "Standard_NC24rs_v3", "Standard_ND40rs_v2"),
        "x86_64",
        None,
        "",
        _EXTENSION,
        excluded="V100 (Volta) cannot use the open kernel modules of the Ubuntu HPC image; it needs the "
        "proprietary CUDA driver (NvidiaGpuDriverLinux extension), which spotrun does not install",
    ),  # fmt: skip
    ImageRow(
        "azure",
        ("M60", "A10"),
        ("Standard_NV", "Standard_NC8ads_A10", "Standard_NC16ads_A10", "Standard_NC32ads_A10"),
        "x86_64",
        None,
        "",
        _EXTENSION,
        excluded="NV and NCads_A10_v4 sizes need the GRID driver (NvidiaGpuDriverLinux extension), which "
        "spotrun does not install",
    ),  # fmt: skip
    ImageRow(
        "azure",
        ("MI300X", "MI25"),
        ("Standard_ND96isr_MI300X", "Standard_NV"),
        "x86_64",
        None,
        "",
        "learn.microsoft.com/azure/virtual-machines/sizes/gpu-accelerated/ndmi300xv5-series (AMD Instinct, ROCm)",
        excluded="AMD GPU: spotrun's Azure image carries NVIDIA drivers only (ROCm is not supported)",
    ),  # fmt: skip
)


def image_for(offer: Offer, configured: str) -> str:
    """This cloud's image for `offer` (see spotrun.clouds.images.image_for)."""
    from spotrun.clouds import images

    return images.image_for(offer, configured, DEFAULT)
