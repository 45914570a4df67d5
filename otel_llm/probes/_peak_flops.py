"""Peak dense FLOP/s of accelerators by device name and matmul dtype, the denominator of MFU.

Numbers are the vendors' dense (no structured sparsity) tensor-core peaks per
device; each row names its source. A device not listed has no peak: MFU is
then absent unless ``OTEL_LLM_PEAK_FLOPS`` gives one, never reported against a
guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import torch

__all__ = ["ACCELERATORS", "Accelerator", "matmul_dtype", "peak_flops", "peak_table"]


@dataclass(frozen=True)
class Accelerator:
    """One accelerator model: how torch names it, its peaks by dtype, and where the numbers come from."""

    label: str
    pattern: str
    """Regular expression matched (case-insensitive) against ``torch.cuda.get_device_name()``."""
    peaks: dict[str, float]
    """FLOP/s by matmul dtype: ``bf16``, ``fp16``, ``tf32``, ``fp32``."""
    source: str


_H100_SXM: Final = {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}
ACCELERATORS: Final[tuple[Accelerator, ...]] = (
    Accelerator("NVIDIA H200 NVL", r"\bH200 NVL\b", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12,
                                                      "fp32": 60.0e12},
                "NVIDIA H200 Tensor Core GPU datasheet (H200 NVL column, dense)"),
    Accelerator("NVIDIA H200", r"\bH200\b", _H100_SXM,
                "NVIDIA H200 Tensor Core GPU datasheet (SXM; dense = half the sparsity figures)"),
    Accelerator("NVIDIA H100 NVL", r"\bH100 NVL\b", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12,
                                                      "fp32": 60.0e12},
                "NVIDIA H100 Tensor Core GPU datasheet (H100 NVL column, dense)"),
    Accelerator("NVIDIA H100 PCIe", r"\bH100\b.*PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378.0e12,
                                                         "fp32": 51.2e12},
                "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe column, dense)"),
    Accelerator("NVIDIA H100 SXM", r"\bH100\b", _H100_SXM,
                "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column, dense)"),
    Accelerator("NVIDIA A100", r"\bA100\b", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
                "NVIDIA A100 Tensor Core GPU datasheet (dense; SXM and PCIe alike)"),
    Accelerator("NVIDIA L40S", r"\bL40S\b", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12,
                                              "fp32": 91.6e12},
                "NVIDIA L40S datasheet (dense)"),
    Accelerator("NVIDIA L4", r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
                "NVIDIA L4 Tensor Core GPU datasheet (dense)"),
    Accelerator("NVIDIA A10", r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
                "NVIDIA A10 Tensor Core GPU datasheet (dense)"),
    Accelerator("NVIDIA V100", r"\bV100\b", {"fp16": 125e12, "fp32": 15.7e12},
                "NVIDIA V100 Tensor Core GPU datasheet (SXM2; no bf16 or tf32 tensor cores)"),
)
"""Searched in order: the first row whose pattern matches names the device (NVL and PCIe rows before SXM)."""


def matmul_dtype(device: torch.device, parameter_dtype: torch.dtype) -> str:
    """The dtype the model's matmuls run in: autocast's when on, else the parameters' (fp32 as tf32 if allowed)."""
    dtype = parameter_dtype
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s of ``device_name`` in ``dtype``, or None when the table does not know it."""
    for accelerator in ACCELERATORS:
        if re.search(accelerator.pattern, device_name, re.IGNORECASE):
            return accelerator.peaks.get(dtype)
    return None


def peak_table() -> str:
    """The table as Markdown (``otel-llm docs peaks``), so the README lists what the code uses."""
    dtypes = ("bf16", "fp16", "tf32", "fp32")
    rows = ["| accelerator | " + " | ".join(f"{d} TFLOP/s" for d in dtypes) + " | source |",
            "|---|" + "---|" * len(dtypes) + "---|"]
    for accelerator in ACCELERATORS:
        cells = [f"{accelerator.peaks[d] / 1e12:g}" if d in accelerator.peaks else "—" for d in dtypes]
        rows.append(f"| {accelerator.label} | " + " | ".join(cells) + f" | {accelerator.source} |")
    return "\n".join(rows)
