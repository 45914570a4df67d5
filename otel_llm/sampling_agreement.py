"""The adaptive sampler's inputs, agreed across data-parallel ranks on the device.

Every rank contributes [loss, non-finite flag, anomaly flag, memory pressure]
of its sampled step; one MAX all-reduce makes them equal everywhere, so every
rank takes the same sampling decision. The vector then rides along in the
step's single device-to-host transfer, so agreeing costs no extra sync.
"""

from __future__ import annotations

import torch

from otel_llm.catalog import GRAD_NORM, TRAIN_LOSS
from otel_llm.probes.base import StepValues
from otel_llm.probes.update_sample import data_parallel_world

__all__ = ["agreed_inputs"]


def _first(values: StepValues, name: str, device: torch.device) -> torch.Tensor | None:
    value = next((value for signal, _, value in values.gauges if signal == name), None)
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, torch.float64)
    return torch.tensor(float(value), dtype=torch.float64).to(device)


def agreed_inputs(values: StepValues, anomalies: int, pressure: float | None, device: torch.device) -> torch.Tensor:
    """The all-reduced decision vector of a sampled step, still on ``device`` (see ``SamplingInputs``)."""
    loss = _first(values, TRAIN_LOSS, device)
    norm = _first(values, GRAD_NORM, device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    for value in (loss, norm):
        if value is not None:
            nonfinite = nonfinite | ~torch.isfinite(value)
    if loss is None:
        agreed_loss = torch.full((), float("-inf"), dtype=torch.float64, device=device)
    else:
        agreed_loss = torch.where(torch.isfinite(loss), loss, float("-inf"))
    flags = torch.tensor([float(anomalies > 0), pressure or 0.0], dtype=torch.float64).to(device)
    vector = torch.cat([agreed_loss.reshape(1), nonfinite.double().reshape(1), flags])
    if data_parallel_world() > 1:
        import torch.distributed as dist

        dist.all_reduce(vector, op=dist.ReduceOp.MAX)
    return vector
