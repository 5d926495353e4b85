"""Which boot image, with which GPU driver, runs an offer: one table per cloud x GPU family.

Each cloud's rows live in `spotrun/clouds/<cloud>/images.py` as plain data (no SDK), each with the
document it was read from. An offer maps to the first row whose provider, GPU and instance-type
family match; a row either names the image and the driver it carries, or says why spotrun cannot
run that GPU there (`image=None`, `excluded=<reason>`). An offer no row covers (an instance family
newer than the table, a hand-made test offer) boots the cloud's default image; tests/test_images.py
fails as soon as the bundled catalog holds such an offer, so the table is extended with the catalog.

The planner drops excluded offers (`spotrun plan` counts them under "no image with a driver for
this GPU"), unless the spec names its own image for that cloud (`aws.ami`, `gcp.image`,
`azure.image`): the driver is then the user's choice. The providers pick their boot image with
`choose(offer)`. docs/providers/<cloud>.md shows the same table; tests/test_images.py checks that
every GPU offer of the bundled catalog maps to a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spotrun.catalog.model import Offer

EXCLUDED = "no image with a driver for this GPU"  # the planner's rejection key


@dataclass(frozen=True)
class ImageRow:
    """One cloud x GPU x instance-family x architecture line of the table."""

    provider: str
    gpus: tuple[str, ...]  # canonical GPU names (spotrun.gpus); () = any GPU of these families
    families: tuple[str, ...]  # instance-type prefixes, e.g. ("g4dn.",) or ("Standard_NC", ...)
    arch: str  # "x86_64" or "arm64"
    image: str | None  # what the provider boots (an SSM parameter, image family, marketplace URN)
    driver: str  # the driver that image carries or installs, and its kind
    source: str  # where the support statement was read (a vendor page or release note)
    tested: str = "request shape against the cloud fake; not booted on a real account"
    excluded: str = ""  # why spotrun does not run this GPU here (then image is None)

    def matches(self, offer: Offer) -> bool:
        if offer.provider != self.provider:
            return False
        if self.gpus and offer.gpu not in self.gpus:
            return False
        return any(offer.instance_type.startswith(f) for f in self.families)


def rows(provider: str) -> tuple[ImageRow, ...]:
    """The table of one cloud (empty for clouds without GPUs of their own, e.g. local)."""
    if provider == "aws":
        from spotrun.clouds.aws.images import ROWS
    elif provider == "gcp":
        from spotrun.clouds.gcp.images import ROWS
    elif provider == "azure":
        from spotrun.clouds.azure.images import ROWS
    else:
        return ()
    return ROWS


def row_for(offer: Offer) -> ImageRow | None:
    """The row an offer maps to, or None when no row covers it."""
    for row in rows(offer.provider):
        if row.matches(offer):
            return row
    return None


def exclusion(offer: Offer) -> str | None:
    """Why `offer` cannot be run with spotrun's images (a sentence), or None when it can.

    CPU-only offers and clouds without a table (local) always can."""
    if not offer.gpu or offer.gpu_count <= 0 or not rows(offer.provider):
        return None
    row = row_for(offer)
    if row is None:
        return None  # not in the table: the default image (tests/test_images.py keeps this empty)
    if row.image is None:
        return row.excluded or "excluded"
    return None


def choose(offer: Offer) -> ImageRow:
    """The row to boot `offer` with; raises ValueError with the reason when it is excluded."""
    why = exclusion(offer)
    if why is not None:
        raise ValueError(why)
    row = row_for(offer)
    if row is None:  # a CPU-only offer, or one the table does not know: the cloud's default image
        return next(r for r in rows(offer.provider) if r.image is not None)
    return row


def image_for(offer: Offer, configured: str, default: str) -> str:
    """The image to boot `offer` with: the configured one when the user chose their own (anything
    but the cloud's `default`), else the offer's row. An excluded offer raises BadRequest with the
    reason."""
    from spotrun.clouds.base import BadRequest

    if configured != default:
        return configured
    try:
        row = choose(offer)
    except ValueError as exc:
        raise BadRequest(f"{offer.instance_type}: {exc}", code="NoImageForGpu") from None
    return row.image or default


def markdown_table(provider: str) -> str:
    """The cloud's table as docs/providers/<cloud>.md shows it (tests/test_images.py keeps the two
    the same: regenerate with `python -c "from spotrun.clouds.images import markdown_table as t;
    print(t('aws'))"`)."""
    lines = [
        "| GPU | instance types | arch | image | driver | source | how it is tested |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows(provider):
        gpus = ", ".join(row.gpus) or "any"
        families = ", ".join(f"`{f.rstrip('.-')}`" for f in row.families)
        image = f"`{row.image}`" if row.image else f"**excluded**: {row.excluded}"
        tested = row.tested if row.image else "tests/test_images.py: the planner never picks it"
        lines.append(f"| {gpus} | {families} | {row.arch} | {image} | {row.driver or '-'} | {row.source} | {tested} |")
    return "\n".join(lines)


GPUS_ENV = "SPOTRUN_GPUS"  # read by the Agent (spotrun/agent/workload.py has the same name)


def gpu_env(offer: Offer) -> dict[str, str]:
    """The boot env telling the Agent how many GPUs the offer has, so it waits for the driver to
    show them before the workload starts (empty for a CPU-only offer)."""
    return {GPUS_ENV: str(offer.gpu_count)} if offer.gpu and offer.gpu_count > 0 else {}
