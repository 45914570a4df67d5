"""#17 memory pressure, read on the host at the end of a sampled step."""

from __future__ import annotations

import os

import torch

from otel_llm.catalog import ATTR_DEVICE, MEMORY_PRESSURE
from otel_llm.probes.base import Probe, StepValues
from otel_llm.probes.optimizer import parameter_device

__all__ = ["MemoryProbe", "memory_pressure"]


def _process_rss_fraction() -> float | None:
    try:  # Linux: two reads, no allocation-heavy library call
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
        return resident_pages / os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / psutil.virtual_memory().total
    except Exception:  # noqa: BLE001 - no way to read memory here: the signal is absent
        return None


def memory_pressure(device: torch.device) -> float | None:
    """CUDA: (total - free) / total of ``device``; CPU: process RSS / physical memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (total - free) / total
    return _process_rss_fraction()


class MemoryProbe(Probe):
    """Memory pressure of the device the trainable parameters live on.

    Always built: pressure above the configured limit widens adaptive sampling.
    """

    name = "memory"
    always = True

    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        values = StepValues()
        device = parameter_device(optimizer)
        pressure = memory_pressure(device)
        if pressure is not None:
            values.gauge(MEMORY_PRESSURE, pressure, {ATTR_DEVICE: str(device)})
        return values
