"""What spotrun knows about GPU models: memory, throughput and relative training speed.

Used by the planner to (a) check that a job's memory need fits a GPU and (b) scale a job's runtime
from one GPU type to another, and by the catalog builder to turn the clouds' many spellings of a GPU
("nvidia-tesla-t4", "A100-80GB", "H100-MEGA", "Tesla V100-SXM2-16GB") into one canonical name.

Where the figures come from:

* ``memory_gb`` / ``memory_variants``: the vendor datasheets (marketing GB; the clouds' APIs report
  slightly less usable memory, e.g. AWS says 22.35 GiB for a "24 GB" L4 or A10G). Multi-GPU boards
  (K80, M60) are listed per GPU *device*, which is what a cloud VM exposes and what CUDA sees.
* ``tflops``: dense (no sparsity) FP16/BF16 tensor throughput from the vendor datasheets, for the
  SXM/OAM variant where one exists. GPUs without fast half precision (K520, K80, M60, P4) list their
  FP32 rate, since that is what training would actually run at.
* ``speed``: relative *training* throughput with A100 = 1.0. Peak TFLOPS overstate the gap between
  generations (memory bandwidth, kernels and communication matter), so these are rounded estimates
  that lean on published training benchmarks (NVIDIA's and Lambda's deep-learning GPU benchmarks,
  MLPerf Training results) more than on peak ratios. They are deliberately coarse: a spec's
  ``workload.hours_on`` overrides them for the GPUs it names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GpuModel:
    name: str  # canonical name, as used in Offer.gpu and in specs
    memory_gb: float  # default variant, per GPU device
    tflops: float  # dense FP16/BF16 tensor TFLOPS (FP32 where the GPU has no fast half precision)
    speed: float  # relative training speed, A100 = 1.0
    vendor: str = "NVIDIA"
    memory_variants: tuple[float, ...] = ()  # other memory sizes sold under the same name
    bf16: bool = False  # native bfloat16 (Ampere and later, CDNA2 and later)
    trainable: bool = True  # False: graphics/VDI parts no mainstream training stack supports
    aliases: tuple[str, ...] = field(default=())

    @property
    def all_memory_gb(self) -> tuple[float, ...]:
        return (self.memory_gb, *self.memory_variants)

    @property
    def relative_speed(self) -> float:
        return self.speed


# Datasheet figures; each comment names the source document.
_MODELS: tuple[GpuModel, ...] = (
    # NVIDIA GRID K520 datasheet: 2 GK104 GPUs, 4 GB each; ~2.4 TFLOPS FP32 per GPU. Graphics part.
    GpuModel("K520", 4, 2.4, 0.03, trainable=False),
    # NVIDIA Tesla K80 datasheet: 2 GK210 per board, 12 GB each, 8.73 TFLOPS FP32 boost per board.
    GpuModel("K80", 12, 4.37, 0.07),
    # NVIDIA Tesla M60 datasheet: 2 GM204 per board, 8 GB each, 9.6 TFLOPS FP32 per board.
    GpuModel("M60", 8, 4.8, 0.06),
    # NVIDIA Tesla P4 datasheet: 8 GB, 5.5 TFLOPS FP32 (no fast FP16).
    GpuModel("P4", 8, 5.5, 0.06),
    # NVIDIA Tesla P100 datasheet: 16 GB (12 GB PCIe variant), FP16 21.2 (SXM2) / 18.7 (PCIe) TFLOPS.
    GpuModel("P100", 16, 18.7, 0.2, memory_variants=(12,)),
    # NVIDIA T4 datasheet: 16 GB, 65 TFLOPS mixed-precision FP16 tensor.
    GpuModel("T4", 16, 65, 0.15, aliases=("T4G",)),
    # NVIDIA Quadro RTX 6000 datasheet: 24 GB, 130.5 tensor TFLOPS (Turing).
    GpuModel("RTX6000", 24, 130.5, 0.35, aliases=("QUADRO RTX 6000", "RTX-6000")),
    # NVIDIA V100 datasheet: 16/32 GB, 125 tensor TFLOPS (SXM2), 112 (PCIe).
    GpuModel("V100", 16, 125, 0.45, memory_variants=(32,)),
    # NVIDIA A10 datasheet: 24 GB, BF16 tensor 125 TFLOPS dense (250 with sparsity).
    GpuModel("A10", 24, 125, 0.4, bf16=True),
    # AWS G5 (A10G): 24 GB; AWS publishes no datasheet; ~70 TFLOPS dense FP16 tensor is the figure
    # NVIDIA's A10G product brief gives (fewer tensor clocks than A10).
    GpuModel("A10G", 24, 70, 0.33, bf16=True),
    # NVIDIA RTX A6000 datasheet: 48 GB, 154.8 TFLOPS dense BF16 tensor (309.7 sparse).
    GpuModel("A6000", 48, 154.8, 0.55, bf16=True, aliases=("RTXA6000", "RTX-A6000", "RTX A6000")),
    # NVIDIA L4 datasheet: 24 GB, BF16 tensor 121 TFLOPS dense (242 sparse).
    GpuModel("L4", 24, 121, 0.3, bf16=True),
    # NVIDIA L40S datasheet: 48 GB, BF16 tensor 362 TFLOPS dense (733 sparse); 864 GB/s memory.
    GpuModel("L40S", 48, 362, 0.9, bf16=True),
    # NVIDIA A100 datasheet: 40/80 GB, BF16 tensor 312 TFLOPS dense.
    GpuModel("A100", 80, 312, 1.0, bf16=True, memory_variants=(40,)),
    # NVIDIA H100 datasheet: SXM 80 GB, BF16 989 TFLOPS dense (1979 sparse); NVL 94 GB.
    GpuModel("H100", 80, 989, 2.0, bf16=True, memory_variants=(94,)),
    # NVIDIA H200 datasheet: 141 GB HBM3e, BF16 989 TFLOPS dense; more bandwidth than H100.
    GpuModel("H200", 141, 989, 2.3, bf16=True),
    # NVIDIA HGX B200 datasheet: 8 GPUs, 36 PFLOPS sparse FP16/BF16 -> 2250 dense per GPU; 180 GB each.
    GpuModel("B200", 180, 2250, 3.5, bf16=True),
    # NVIDIA HGX B300 datasheet: 288 GB HBM3e per GPU, BF16 like B200 (gains are mostly FP4).
    GpuModel("B300", 288, 2250, 3.8, bf16=True),
    # NVIDIA RTX PRO 4500 Blackwell datasheet: 32 GB GDDR7; ~ RTX 5080-class tensor throughput.
    GpuModel("RTXPRO4500", 32, 200, 0.5, bf16=True, aliases=("RTX PRO 4500",)),
    # NVIDIA RTX PRO 6000 Blackwell Server Edition datasheet: 96 GB GDDR7, ~500 TFLOPS dense FP16.
    GpuModel("RTXPRO6000", 96, 500, 1.3, bf16=True, aliases=("RTX PRO SERVER 6000", "RTX PRO 6000")),
    # AMD Radeon Instinct MI25 datasheet: 16 GB, 24.6 TFLOPS FP16. Azure NVv4 sells slices for VDI.
    GpuModel("MI25", 16, 24.6, 0.1, vendor="AMD", trainable=False),
    # AMD Radeon Pro V520 (AWS g4ad): 8 GB, graphics/VDI part.
    GpuModel("V520", 8, 14.7, 0.08, vendor="AMD", trainable=False, aliases=("RADEON PRO V520",)),
    # AMD Instinct MI300X datasheet: 192 GB HBM3, BF16 1307.4 TFLOPS dense.
    GpuModel("MI300X", 192, 1307.4, 1.8, vendor="AMD", bf16=True),
)

GPU_MODELS: dict[str, GpuModel] = {m.name: m for m in _MODELS}
GPU_NAMES: tuple[str, ...] = tuple(m.name for m in _MODELS)

# Words that decorate a GPU name without changing the model (vendor, product line, form factor).
_NOISE = re.compile(r"\b(nvidia|amd|tesla|instinct|geforce|sxm\d?|pcie|hbm\d?e?|nvl|mega|server edition)\b")
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)\s*g(?:i?b)?\b")


def _norm(text: str) -> str:
    return re.sub(r"[\s_\-]+", "", text.lower())


_LOOKUP: dict[str, str] = {}
for _m in _MODELS:
    _LOOKUP[_norm(_m.name)] = _m.name
    for _a in _m.aliases:
        _LOOKUP[_norm(_a)] = _m.name


def parse_gpu(text: str) -> tuple[str | None, float | None]:
    """Split a cloud's GPU label into (canonical name, memory GB if the label states one).

    "A100-80GB" -> ("A100", 80.0); "nvidia-tesla-t4" -> ("T4", None); "H100-MEGA" -> ("H100", None);
    "nvidia-h200-141gb" -> ("H200", 141.0); "V100-32GB" -> ("V100", 32.0); "TPU-v4" -> (None, None).
    """
    if not text:
        return None, None
    low = text.strip().lower().replace("_", " ")
    memory: float | None = None
    mem = _MEMORY.search(low)
    if mem and _norm(low) not in _LOOKUP:
        memory = float(mem.group(1))
        low = low[: mem.start()] + low[mem.end() :]
    # "rtx pro server 6000" must be matched before the noise words are removed.
    direct = _LOOKUP.get(_norm(low))
    if direct:
        return direct, memory
    cleaned = _NOISE.sub(" ", low.replace("-", " "))
    key = _norm(cleaned)
    if key in _LOOKUP:
        return _LOOKUP[key], memory
    return None, None


def canonical_gpu_name(text: str | None) -> str | None:
    """The canonical GPU name for any spelling the clouds or users use; None if unknown."""
    if not text:
        return None
    return parse_gpu(text)[0]


def gpu_model(name: str | None) -> GpuModel | None:
    """The GpuModel for a name in any spelling, or None."""
    canon = canonical_gpu_name(name)
    return GPU_MODELS.get(canon) if canon else None


def relative_speed(name: str | None) -> float | None:
    """Training speed relative to one A100 (1.0), or None for an unknown GPU."""
    model = gpu_model(name)
    return model.speed if model else None


# --------------------------------------------------------------------------- memory need

# Bytes per parameter of optimizer state (kept in FP32 by mixed-precision training, as in the
# ZeRO paper, Rajbhandari et al. 2020, section 3.1: Adam = FP32 master weights + momentum + variance).
_OPTIMIZER_STATE_BYTES: dict[str, float] = {
    "adam": 8.0,
    "adamw": 8.0,
    "adam8bit": 2.0,
    "lion": 4.0,
    "adafactor": 0.5,  # factored second moment: a few bytes per row/column, tiny per parameter
    "sgd": 4.0,  # momentum
    "sgd-nomomentum": 0.0,
    "none": 0.0,  # inference / frozen weights
}
_PRECISION_BYTES: dict[str, float] = {"fp32": 4.0, "tf32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}
ACTIVATION_MARGIN = 0.2  # activations, fragmentation and buffers, as a share of the states
CUDA_CONTEXT_GB = 1.0  # CUDA/ROCm context and kernels, per GPU


def bytes_per_param(precision: str = "bf16", optimizer: str = "adamw") -> float:
    """Training bytes per parameter: weights + gradients + optimizer state.

    Mixed precision (bf16/fp16/fp8) keeps an FP32 master copy of the weights besides the low
    precision one (4 bytes more); pure FP32 training does not need one.
    """
    p = _PRECISION_BYTES.get(precision.lower(), 2.0)
    opt = _OPTIMIZER_STATE_BYTES.get(optimizer.lower().replace("_", "").replace(" ", ""), 8.0)
    master = 0.0 if p >= 4.0 else 4.0
    return p + p + master + opt  # weights + grads + master + optimizer state


def estimate_memory_gb(params: float, *, precision: str = "bf16", optimizer: str = "adamw", gpus: int = 1) -> float:
    """GPU memory (GB, per GPU) a training job of `params` parameters needs.

    States are assumed sharded over the instance's GPUs (FSDP / ZeRO-3), so the per-GPU need falls
    with `gpus`; the activation margin and the CUDA context do not shrink.
    """
    states_gb = params * bytes_per_param(precision, optimizer) / 1e9
    return states_gb * (1.0 + ACTIVATION_MARGIN) / max(gpus, 1) + CUDA_CONTEXT_GB


def checkpoint_gb(params: float, *, precision: str = "bf16", optimizer: str = "adamw") -> float:
    """Size of a full training checkpoint (weights + master copy + optimizer state, no gradients)."""
    return params * (bytes_per_param(precision, optimizer) - _PRECISION_BYTES.get(precision.lower(), 2.0)) / 1e9


def nominal_memory_gb(name: str | None, reported_gb: float | None) -> float | None:
    """The datasheet size a cloud's reported GPU memory stands for.

    Clouds report usable memory in GiB or MiB (AWS: 22.35 GiB for a "24 GB" A10G/L4, 15 GiB for
    a "16 GB" T4 on some APIs; 179 GiB for a "180 GB" B200), so sizes within 12% below a known
    variant of the model snap to it; anything else is returned as reported.
    """
    model = gpu_model(name)
    if reported_gb is None:
        return model.memory_gb if model else None
    if model:
        for size in sorted(model.all_memory_gb):
            if size * 0.88 <= reported_gb <= size * 1.02:
                return float(size)
    return round(reported_gb, 2)
