"""GPU knowledge: names in every spelling the clouds use, memory needs, datasheet sizes."""

from __future__ import annotations

import pytest

from spotrun.gpus import (
    GPU_MODELS,
    GPU_NAMES,
    bytes_per_param,
    canonical_gpu_name,
    checkpoint_gb,
    estimate_memory_gb,
    gpu_model,
    nominal_memory_gb,
    parse_gpu,
    relative_speed,
)


@pytest.mark.parametrize(
    ("text", "name", "memory"),
    [
        ("A100", "A100", None),
        ("a100-80gb", "A100", 80.0),
        ("A100-80GB", "A100", 80.0),
        ("nvidia-tesla-a100", "A100", None),
        ("nvidia-a100-80gb", "A100", 80.0),
        ("nvidia-tesla-t4", "T4", None),
        ("Tesla T4", "T4", None),
        ("T4g", "T4", None),
        ("H100-MEGA", "H100", None),
        ("nvidia-h100-mega-80gb", "H100", 80.0),
        ("H100 80GB", "H100", 80.0),
        ("nvidia-h200-141gb", "H200", 141.0),
        ("V100-32GB", "V100", 32.0),
        ("Tesla V100-SXM2-16GB", "V100", 16.0),
        ("nvidia-l4", "L4", None),
        ("L40S", "L40S", None),
        ("a10g", "A10G", None),
        ("A10", "A10", None),
        ("RTX A6000", "A6000", None),
        ("RTX PRO Server 6000", "RTXPRO6000", None),
        ("Radeon Pro V520", "V520", None),
        ("MI300X", "MI300X", None),
        ("tpu-v4-8", None, None),
        ("Trainium2", None, None),
        ("", None, None),
    ],
)
def test_parse_gpu(text: str, name: str | None, memory: float | None) -> None:
    assert parse_gpu(text) == (name, memory)
    assert canonical_gpu_name(text) == name


def test_table_covers_the_models_seen_in_the_data() -> None:
    needed = {"K80", "M60", "P4", "P100", "T4", "V100", "A10", "A10G", "L4", "L40S", "A100", "H100", "H200",
              "B200", "RTX6000", "A6000", "MI300X"}  # fmt: skip
    assert needed <= set(GPU_NAMES)
    assert GPU_MODELS["A100"].all_memory_gb == (80, 40)
    assert gpu_model("nvidia-tesla-v100").memory_variants == (32,)  # type: ignore[union-attr]
    assert relative_speed("A100") == 1.0
    # Newer generations train faster; the ordering is what the planner relies on.
    speeds = [relative_speed(n) for n in ("K80", "T4", "V100", "A100", "H100", "B200")]
    assert speeds == sorted(speeds)


def test_every_model_is_consistent() -> None:
    for m in GPU_MODELS.values():
        assert m.memory_gb > 0 and m.tflops > 0 and m.speed > 0, m
        assert canonical_gpu_name(m.name) == m.name


def test_memory_estimate() -> None:
    assert bytes_per_param("bf16", "adamw") == 16  # 2 weights + 2 grads + 4 master + 8 Adam
    assert bytes_per_param("fp32", "adamw") == 16  # 4 + 4 + 8, no master copy
    assert bytes_per_param("bf16", "sgd") == 12
    assert estimate_memory_gb(1e9) == pytest.approx(16 * 1.2 + 1)
    assert estimate_memory_gb(7e9, gpus=8) == pytest.approx(112 * 1.2 / 8 + 1)
    assert checkpoint_gb(7e9) == pytest.approx(7e9 * 14 / 1e9)


@pytest.mark.parametrize(
    ("name", "reported", "nominal"),
    [("L4", 22.35, 24.0), ("A10G", 22.35, 24.0), ("T4", 15.0, 16.0), ("B200", 179.06, 180.0),
     ("A100", 40.0, 40.0), ("H100", 93.0, 94.0), ("A100", 60.0, 60.0), ("H200", None, 141.0)],
)  # fmt: skip
def test_nominal_memory(name: str, reported: float | None, nominal: float) -> None:
    assert nominal_memory_gb(name, reported) == nominal
