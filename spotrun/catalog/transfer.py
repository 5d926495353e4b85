"""What moving and keeping bytes costs, and how long a cloud takes to hand over and take back a VM.

The planner adds these to the compute cost of an offer: checkpoints kept in the Store while the job
runs, and data/checkpoints moved between the Store and the instance when they sit in different
regions or clouds. All prices are public list prices in USD, first pricing tier, as of 2025:

* Storage, USD per GB-month (standard/hot class, one region):
  - S3 Standard, us-east-1, first 50 TB: 0.023 (aws.amazon.com/s3/pricing)
  - Cloud Storage Standard, regional (us-central1): 0.020 (cloud.google.com/storage/pricing)
  - Azure Blob Hot LRS, East US, first 50 TB: 0.018 (azure.microsoft.com/pricing/details/storage/blobs)
  - a local directory: 0
* Egress, USD per GB, charged by the cloud the bytes *leave* (ingress is free on all three):
  - to the internet / another cloud: AWS 0.09 (first 10 TB/month, aws.amazon.com/ec2/pricing/on-demand
    "Data Transfer"), GCP 0.12 (Premium Tier, first TB, cloud.google.com/vpc/network-pricing),
    Azure 0.087 (first 10 TB from North America/Europe, azure.microsoft.com/pricing/details/bandwidth)
  - between two regions of the same cloud: 0.02 on all three (within one continent; the same pages)
  - within one region: 0 (instance <-> object store in the same region is free on all three)
  - from a local machine: 0 (the user's uplink is not billed by spotrun's clouds)
"""

from __future__ import annotations

STORAGE_USD_PER_GB_MONTH: dict[str, float] = {"aws": 0.023, "gcp": 0.020, "azure": 0.018, "local": 0.0}
INTERNET_EGRESS_USD_PER_GB: dict[str, float] = {"aws": 0.09, "gcp": 0.12, "azure": 0.087, "local": 0.0}
INTER_REGION_USD_PER_GB: dict[str, float] = {"aws": 0.02, "gcp": 0.02, "azure": 0.02, "local": 0.0}
HOURS_PER_MONTH = 730.0

# Preemption notice each cloud gives before it takes a spot VM back (documented minimums):
# AWS two-minute interruption notice; GCP preemption/spot ACPI soft-off with 30 s; Azure Scheduled
# Events "Preempt" with at least 30 s. The local market's default notice is 30 s too.
NOTICE_SECONDS: dict[str, float] = {"aws": 120.0, "gcp": 30.0, "azure": 30.0, "local": 30.0}

# Time from "relaunch" to "training again", excluding the data/checkpoint download (added separately):
# request + boot + agent install. Typical cloud GPU VM boots take 1-3 minutes; local processes seconds.
BOOT_SECONDS: dict[str, float] = {"aws": 180.0, "gcp": 180.0, "azure": 240.0, "local": 5.0}

# Effective throughput for pulling data/checkpoints from the Store and for a final save + upload.
TRANSFER_GB_PER_SECOND = 0.25


def storage_usd_per_gb_month(store_provider: str) -> float:
    return STORAGE_USD_PER_GB_MONTH.get(store_provider, 0.0)


def egress_usd_per_gb(src_provider: str, src_region: str | None, dst_provider: str, dst_region: str | None) -> float:
    """USD per GB to move bytes from (src cloud, region) to (dst cloud, region).

    An unknown region (None) on either side of a same-cloud move counts as the same region: the
    planner says so in its notes rather than guessing a charge.
    """
    if src_provider == "local":
        return 0.0
    if src_provider != dst_provider:
        return INTERNET_EGRESS_USD_PER_GB.get(src_provider, 0.0)
    if src_region is None or dst_region is None or src_region == dst_region:
        return 0.0
    return INTER_REGION_USD_PER_GB.get(src_provider, 0.0)
