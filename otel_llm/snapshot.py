"""Hand-off from the device to the exporters: one transfer per sampled step.

``transfer`` packs every device value of the step into one float64 vector,
copies it to the host once, and unpacks it. ``Snapshot`` is the immutable
result the observable-gauge callbacks read; they never compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from otel_llm.probes.base import StepValues

__all__ = ["GaugePoints", "HistogramPoints", "Publication", "Snapshot", "to_host", "transfer"]

GaugePoints = tuple[tuple[Mapping[str, str], float], ...]
"""(attributes, value) pairs of one gauge."""
HistogramPoints = tuple[str, Mapping[str, str], np.ndarray]
"""(name, attributes, measurements) of one histogram stream in one step."""


def transfer(values: Mapping[str, torch.Tensor | float | int]) -> dict[str, np.ndarray]:
    """All ``values`` on the host as float64 arrays, with a single device-to-host copy."""
    names = list(values)
    tensors = [values[n] for n in names if isinstance(values[n], torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    flat = [torch.as_tensor(values[n], dtype=torch.float64).reshape(-1).to(device) if not
            isinstance(values[n], torch.Tensor) else values[n].detach().reshape(-1).to(device, torch.float64)
            for n in names]
    host = torch.cat(flat).cpu().numpy() if flat else np.zeros(0)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, part in zip(names, flat):
        out[name] = host[offset:offset + part.numel()]
        offset += part.numel()
    return out


def to_host(values: StepValues, extra: Mapping[str, torch.Tensor]
            ) -> tuple[dict[str, GaugePoints], list[HistogramPoints], dict[str, np.ndarray]]:
    """Gauges, histogram measurements (only the kept entries) and ``extra``, with one transfer."""
    packed: dict[str, torch.Tensor | float | int] = dict(extra)
    for index, (_, _, tensor) in enumerate(values.gauges):
        packed[f"g{index}"] = tensor
    for index, (_, _, tensor, keep) in enumerate(values.histograms):
        packed[f"h{index}"] = tensor
        if keep is not None:
            packed[f"k{index}"] = keep
    host = transfer(packed) if packed else {}
    gauges: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    for index, (name, attributes, _) in enumerate(values.gauges):
        gauges.setdefault(name, []).append((attributes, float(host[f"g{index}"][0])))
    histograms: list[HistogramPoints] = []
    for index, (name, attributes, _, keep) in enumerate(values.histograms):
        measurements = host[f"h{index}"]
        if keep is not None:
            measurements = measurements[host[f"k{index}"] > 0]
        histograms.append((name, attributes, measurements))
    return {k: tuple(v) for k, v in gauges.items()}, histograms, {k: host[k] for k in extra}


@dataclass(frozen=True)
class Snapshot:
    """The latest sampled step's gauge values, as plain Python numbers."""

    step: int = -1
    gauges: Mapping[str, GaugePoints] = field(default_factory=dict)


@dataclass
class Publication:
    """Everything one step hands to the exporter thread.

    All host values, except ``device_tokens`` on non-sampled steps: a token count
    still on the device, read by the exporter thread so the training thread never waits.
    """

    step: int
    sampled: bool
    steps: int = 0
    tokens: int = 0
    device_tokens: torch.Tensor | None = None
    durations: list[float] = field(default_factory=list)
    gauges: dict[str, GaugePoints] = field(default_factory=dict)
    histograms: list[HistogramPoints] = field(default_factory=list)
    overhead: float | None = None
