"""The offer: one row of the market, per (provider, region, zone, instance type)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Offer:
    provider: str  # "local" | "aws" | "gcp" | "azure"
    region: str
    zone: str  # "" where the cloud has no zones in its price data (Azure)
    instance_type: str
    gpu: str | None  # canonical GPU model name, e.g. "A100", "H100", "T4"; None for CPU-only
    gpu_count: int
    gpu_memory_gb: float  # per GPU
    vcpus: float
    memory_gb: float
    spot_price: float | None  # USD per hour for the whole instance; None if spot is not offered
    ondemand_price: float | None  # USD per hour
    interruption_rate: float  # expected spot preemptions per hour
    interruption_source: str = "prior"  # "measured:<source>" or "prior"
    observed: str = ""  # ISO date the prices were observed
    # added by catalog: share of probes that found spot capacity (from traces); None if unknown
    availability: float | None = None

    @property
    def key(self) -> str:
        """A stable identity used for cooldowns and in state: provider/zone-or-region/type."""
        base = f"{self.provider}/{self.zone or self.region}/{self.instance_type}"
        # added by catalog: a GCP N1 machine type takes an attached GPU of several models, so the GPU
        # is part of its identity (n1-standard-8 with a T4 is not n1-standard-8 with a V100).
        if self.provider == "gcp" and self.instance_type.startswith("n1-") and self.gpu:
            return f"{base}+{self.gpu}x{self.gpu_count}"
        return base

    @property
    def location(self) -> str:
        return self.zone or self.region

    def price(self, spot: bool) -> float | None:
        return self.spot_price if spot else self.ondemand_price

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Offer:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
