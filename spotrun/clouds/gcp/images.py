"""GCP rows of the image table (spotrun/clouds/images.py): which Deep Learning VM image family
boots which Compute Engine GPU machine series. The DLVM images install the NVIDIA driver at first
boot (metadata `install-nvidia-driver=True`); the Agent waits for it (agent/workload.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spotrun.clouds.images import ImageRow

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer

DLVM_CU124 = "projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204-py310"
DLVM_CU128 = "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570"

_DRIVERS = (
    "cloud.google.com/compute/docs/gpus/install-drivers-gpu (required NVIDIA driver per GPU: R550 covers "
    "P4, P100, V100, T4, L4, A100, H100, H200; Blackwell B200 needs R570 or later, as NVIDIA's GPU operator "
    "notes say: 'HGX B200 requires 570.133.20 or later'); cloud.google.com/deep-learning-vm/docs/images"
)
DEFAULT = DLVM_CU124  # the provider's default image

ROWS: tuple[ImageRow, ...] = (
    ImageRow(
        "gcp",
        ("T4", "V100", "P100", "P4"),
        ("n1-",),
        "x86_64",
        DLVM_CU124,
        "NVIDIA R550 (installed at first boot), CUDA 12.4",
        _DRIVERS,
    ),  # fmt: skip
    ImageRow(
        "gcp",
        ("L4", "A100", "H100", "H200"),
        ("g2-", "a2-", "a3-"),
        "x86_64",
        DLVM_CU124,
        "NVIDIA R550 (installed at first boot), CUDA 12.4",
        _DRIVERS,
    ),  # fmt: skip
    ImageRow(
        "gcp",
        ("B200",),
        ("a4-",),
        "x86_64",
        DLVM_CU128,
        "NVIDIA R570 (installed at first boot), CUDA 12.8",
        _DRIVERS,
    ),  # fmt: skip
    ImageRow(
        "gcp",
        (),
        ("a4x-",),
        "arm64",
        None,
        "",
        "cloud.google.com/compute/docs/accelerator-optimized-machines (A4X: NVIDIA GB200 with Arm Grace CPUs)",
        excluded="A4X is arm64: spotrun's GCP images are x86_64",
    ),  # fmt: skip
    ImageRow(
        "gcp",
        ("K80",),
        ("n1-",),
        "x86_64",
        None,
        "",
        "cloud.google.com/compute/docs/eol/k80-eol (K80 GPUs retired on 2024-05-01)",
        excluded="GCP retired its K80 GPUs (and Kepler needs R470, which no DLVM image carries)",
    ),  # fmt: skip
)


def image_for(offer: Offer, configured: str) -> str:
    """This cloud's image for `offer` (see spotrun.clouds.images.image_for)."""
    from spotrun.clouds import images

    return images.image_for(offer, configured, DEFAULT)
