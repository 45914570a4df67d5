"""The gradient statistics' two code paths (per tensor on CPU, multi-tensor elsewhere) against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from otel_llm.probes import _tensor_stats
from otel_llm.probes._tensor_stats import counts_above, floor_in_dtype, squared_norms

CPU = torch.device("cpu")


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (48,), (3, 5, 7), (1,), (200,)]
    tensors = [(torch.randn(shape, generator=generator) * 1e-3).to(dtype) for shape in shapes]
    tensors[1][:10] = 0.0
    tensors[4][:50] = 1e-4  # exactly at the threshold in float64: not above it
    return tensors


def _reference_counts(tensors: list[torch.Tensor], threshold: float) -> list[float]:
    return [float((np.abs(t.double().numpy()) > threshold).sum()) for t in tensors]


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per-tensor", "multi-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("budget", [1 << 30, 512], ids=["whole", "waves"])
def test_counts_above_match_numpy(monkeypatch, per_tensor: bool, dtype: torch.dtype, budget: int) -> None:
    monkeypatch.setattr(_tensor_stats, "PER_TENSOR_DEVICES", frozenset({"cpu"}) if per_tensor else frozenset())
    tensors = _tensors(dtype)
    counts = counts_above(tensors, 1e-4, CPU, budget)
    assert counts.dtype == torch.float64
    assert counts.tolist() == _reference_counts(tensors, 1e-4)


def test_a_threshold_between_two_bfloat16_values_compares_as_in_float64() -> None:
    threshold = 1.0 + 2**-9  # halfway between 1 and bfloat16's next value, 1 + 2**-7: rounds either way
    floor = floor_in_dtype(threshold, torch.bfloat16)
    assert floor == 1.0
    values = torch.tensor([1.0, 1.0 + 2**-7, -(1.0 + 2**-7)], dtype=torch.bfloat16)
    assert counts_above([values], threshold, CPU, 1 << 20).tolist() == [2.0]


def test_squared_norms_of_mixed_dtypes_keep_the_order() -> None:
    tensors = _tensors(torch.float32)
    tensors[2] = tensors[2].to(torch.bfloat16)
    expected = [float((t.double().numpy() ** 2).sum()) for t in tensors]
    np.testing.assert_allclose(squared_norms(tensors, CPU).tolist(), expected, rtol=1e-5)
