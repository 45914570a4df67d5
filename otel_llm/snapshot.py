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

__all__ = ["GaugePoints", "Publication", "Snapshot", "transfer"]

GaugePoints = tuple[tuple[Mapping[str, str], float], ...]
"""(attributes, value) pairs of one gauge."""


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
    values: dict[str, np.ndarray] = field(default_factory=dict)
    gauges: dict[str, GaugePoints] = field(default_factory=dict)
    overhead: float | None = None
