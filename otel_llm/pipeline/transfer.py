"""Hand-off from the device to the exporters: one transfer per sampled step.

:func:`to_host` packs every device value of the step (the probes' values and
the sampling decision vector) into one float64 vector, copies it to the host
once, and unpacks it by position into a :class:`HostStep`. Values already on
the host skip the copy. :class:`Snapshot` is the immutable result the
observable-gauge callbacks read; they never compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from otel_llm.probes.base import Counter, StepValues

__all__ = ["CounterPoint", "GaugePoints", "HistogramPoints", "HostStep", "Publication", "Snapshot", "to_host",
           "transfer"]

GaugePoints = tuple[tuple[Mapping[str, str], float], ...]
"""(attributes, value) pairs of one gauge."""
HistogramPoints = tuple[str, Mapping[str, str], np.ndarray]
"""(name, attributes, measurements) of one histogram stream in one step."""
CounterPoint = tuple[str, Mapping[str, str], int | torch.Tensor]
"""(name, attributes, increment): a host integer, or a device count the exporter thread reads."""


def transfer(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Each tensor on the host as a flat float64 array, with a single device-to-host copy."""
    if not tensors:
        return []
    device = tensors[0].device
    flat = [tensor.detach().reshape(-1).to(device, torch.float64) for tensor in tensors]
    host = torch.cat(flat).cpu().numpy()
    out: list[np.ndarray] = []
    offset = 0
    for part in flat:
        out.append(host[offset:offset + part.numel()])
        offset += part.numel()
    return out


@dataclass(frozen=True)
class HostStep:
    """A sampled step's values on the host."""

    gauges: dict[str, GaugePoints]
    histograms: list[HistogramPoints]
    counters: list[CounterPoint]
    decision: np.ndarray | None
    """The sampling decision vector, to decode with :meth:`otel_llm.pipeline.sampler.SamplingInputs.decode`."""


class _Packer:
    """Collects the tensors to copy; each ``add`` returns where its host array will be."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1


def _host_counter(counter: Counter, host: list[np.ndarray], slot: int | None) -> CounterPoint:
    value = counter.value if slot is None else int(host[slot][0])
    return counter.name, counter.attributes, value


def to_host(values: StepValues, decision: torch.Tensor | None = None) -> HostStep:
    """Gauges, histogram measurements (only the kept entries), counters and ``decision``, with one transfer."""
    packer = _Packer()
    gauge_slots = [packer.add(g.value) if isinstance(g.value, torch.Tensor) else None for g in values.gauges]
    histogram_slots = [(packer.add(h.values), packer.add(h.keep) if h.keep is not None else None)
                       if isinstance(h.values, torch.Tensor) else (None, None) for h in values.histograms]
    counter_slots = [packer.add(c.value) if isinstance(c.value, torch.Tensor) else None for c in values.counters]
    decision_slot = packer.add(decision) if decision is not None else None
    host = transfer(packer.tensors)

    gauges: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    for gauge, slot in zip(values.gauges, gauge_slots):
        value = float(host[slot][0]) if slot is not None else float(gauge.value)
        gauges.setdefault(gauge.name, []).append((gauge.attributes, value))
    histograms: list[HistogramPoints] = []
    for histogram, (slot, keep_slot) in zip(values.histograms, histogram_slots):
        if slot is None:  # measured on the host
            histograms.append((histogram.name, histogram.attributes, np.asarray(histogram.values, np.float64)))
            continue
        measurements = host[slot]
        if keep_slot is not None:
            measurements = measurements[host[keep_slot] > 0]
        histograms.append((histogram.name, histogram.attributes, measurements))
    counters = [_host_counter(counter, host, slot) for counter, slot in zip(values.counters, counter_slots)]
    return HostStep({k: tuple(v) for k, v in gauges.items()}, histograms, counters,
                    host[decision_slot] if decision_slot is not None else None)


@dataclass(frozen=True)
class Snapshot:
    """The latest sampled step's gauge values, as plain Python numbers."""

    gauges: Mapping[str, GaugePoints] = field(default_factory=dict)


@dataclass
class Publication:
    """Everything one step hands to the exporter thread.

    All host values, except device counts in ``counters`` on non-sampled steps:
    the exporter thread reads those so the training thread never waits.
    """

    step: int
    sampled: bool
    counters: list[CounterPoint] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    gauges: dict[str, GaugePoints] = field(default_factory=dict)
    histograms: list[HistogramPoints] = field(default_factory=list)
    overhead: float | None = None
