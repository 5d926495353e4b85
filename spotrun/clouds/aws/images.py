"""AWS rows of the image table (spotrun/clouds/images.py): which Deep Learning AMI boots which
EC2 GPU family. Images are named by their SSM public parameter, per AWS's naming rule
`/aws/service/deeplearning/ami/<arch>/<AMI name without "deep", "learning", "ami">/latest/ami-id`
(docs.aws.amazon.com/dlami/latest/devguide/find-dlami-id.html)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spotrun.clouds.images import ImageRow

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer

OSS_X86 = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
OSS_ARM = "/aws/service/deeplearning/ami/arm64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
# Derived by the naming rule above, not seen published: if SSM does not have it, the launch finds the
# image by name instead (_PATTERNS below), as it does for any parameter it cannot read.
PROPRIETARY_X86 = "/aws/service/deeplearning/ami/x86_64/base-proprietary-nvidia-driver-amazon-linux-2/latest/ami-id"

_OSS_NOTES = (
    "AWS DLAMI release notes, 'Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)': "
    "supported_ec2_instances G4dn, G5, G6, Gr6, G6e, P4d, P4de, P5, P5e, P5en, P6-B200, P6-B300 "
    "(NVIDIA open kernel modules, R570 in 2025 and R580/R595 in 2026 releases)"
)
_ARM_NOTES = (
    "AWS DLAMI release notes, 'Deep Learning ARM64 Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)': "
    "supported_ec2_instances G5g, P6e-GB200"
)
_PROPRIETARY_NOTES = (
    "AWS DLAMI release notes, 'Deep Learning Base Proprietary Nvidia Driver AMI (Amazon Linux 2)' "
    "71.6 (2026-01-02): supported_ec2_instances 'G3 (G3.16x not supported), P3, P3dn', driver 570.195.03; "
    "release 73.1 (2026-06-05) lists G3 and P4d only"
)

ROWS: tuple[ImageRow, ...] = (
    ImageRow(
        "aws",
        (),
        ("g4dn.", "g5.", "g6.", "gr6.", "g6e.", "p4d.", "p4de.", "p5.", "p5e.", "p5en.", "p6-b200.", "p6-b300."),
        "x86_64",
        OSS_X86,
        "NVIDIA open kernel modules (R570+), CUDA 12.x",
        _OSS_NOTES,
    ),  # fmt: skip
    ImageRow(
        "aws",
        ("T4",),
        ("g5g.",),
        "arm64",
        OSS_ARM,
        "NVIDIA open kernel modules (R580+), arm64",
        _ARM_NOTES,
    ),  # fmt: skip
    ImageRow(
        "aws",
        ("M60",),
        ("g3.16xlarge",),
        "x86_64",
        None,
        "",
        _PROPRIETARY_NOTES,
        excluded="g3.16xlarge is the one G3 size the proprietary-driver DLAMI does not support",
    ),  # fmt: skip
    ImageRow(
        "aws",
        ("V100", "M60"),
        ("p3.", "p3dn.", "g3.", "g3s."),
        "x86_64",
        PROPRIETARY_X86,
        "NVIDIA proprietary driver R570 (Volta and Maxwell need it: the open modules start at Turing)",
        _PROPRIETARY_NOTES,
        tested="request shape against moto; not booted on a real account. Amazon Linux 2's own python3 is "
        "3.7: if the image's python3 is older than 3.9 the boot fails and says so",
    ),  # fmt: skip
    ImageRow(
        "aws",
        ("K80",),
        ("p2.",),
        "x86_64",
        None,
        "",
        "NVIDIA: R470 is the last driver branch for Kepler; every current DLAMI ships R535 or newer",
        excluded="K80 (Kepler) needs the R470 driver, which no current Deep Learning AMI carries",
    ),  # fmt: skip
    ImageRow(
        "aws",
        ("RTXPRO4500", "RTXPRO6000"),
        ("g7.", "g7e."),
        "x86_64",
        None,
        "",
        _OSS_NOTES,
        excluded="G7/G7e are not among the Base OSS Ubuntu 22.04 DLAMI's supported instances; "
        "set aws.ami to an image whose driver supports them",
    ),  # fmt: skip
    ImageRow(
        "aws",
        ("V520",),
        ("g4ad.",),
        "x86_64",
        None,
        "",
        "AWS G4ad: AMD Radeon Pro V520 (AMD driver)",
        excluded="AMD GPU: spotrun's AWS images carry NVIDIA drivers only",
    ),  # fmt: skip
)

# The AMI names to search for when a parameter is not readable (same order as the parameters).
_PATTERNS = {
    OSS_X86: ("Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *",),
    OSS_ARM: ("Deep Learning ARM64 Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *",),
    PROPRIETARY_X86: ("Deep Learning Base Proprietary Nvidia Driver AMI (Amazon Linux 2) *",),
}


def ami_choice(offer: Offer, default_parameter: str, *, custom_ami: bool = False) -> dict[str, Any]:
    """`LaunchResources.image` arguments for `offer`: its row's SSM parameter, name patterns and
    architecture. A provider configured with another parameter than the default (`ami_parameter`:
    a mirror, a test) keeps it, as a configured `ami` is kept: the image is then the user's choice.
    Raises BadRequest for an excluded offer (the planner drops those first; a hand-made offer may
    still get here)."""
    from spotrun.clouds.base import BadRequest
    from spotrun.clouds.images import choose

    if custom_ami or default_parameter != OSS_X86:
        return {"parameter": default_parameter}
    try:
        row = choose(offer)
    except ValueError as exc:
        raise BadRequest(f"{offer.instance_type}: {exc}", code="NoImageForGpu") from None
    parameter = row.image or OSS_X86
    return {"parameter": parameter, "patterns": _PATTERNS.get(parameter, ()), "arch": row.arch}
