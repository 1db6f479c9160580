"""Benchmarks: vitkit against timm, same process, alternating (``vitkit bench``)."""

from .speed import (
    SpeedResult,
    bench_main,
    compare,
    count_flops,
    cpu_has_bf16_arithmetic,
    format_table,
    model_flops_per_image,
    timm_twin,
)

__all__ = [
    "SpeedResult",
    "bench_main",
    "compare",
    "count_flops",
    "cpu_has_bf16_arithmetic",
    "format_table",
    "model_flops_per_image",
    "timm_twin",
]
