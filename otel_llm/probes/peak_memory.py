"""Peak memory since the previous sampled step, beside memory pressure (#17).

CUDA: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the
parameters' device, then ``reset_peak_memory_stats`` so the next sample covers
only its own window (code that reads those peaks itself sees them reset at
each sampled step). CPU: the process's peak resident set (``VmHWM``), reset by
writing 5 to ``/proc/self/clear_refs`` (Linux); elsewhere the signal is absent.
"""

from __future__ import annotations

import torch

from otel_llm.catalog import ATTR_DEVICE, MEMORY_PEAK_ALLOCATED, MEMORY_PEAK_RESERVED
from otel_llm.probes.base import Probe, StepValues
from otel_llm.probes.optimizer import parameter_device

__all__ = ["PeakMemoryProbe", "peak_rss"]


def peak_rss(reset: bool = False) -> int | None:
    """The process's peak RSS in bytes (Linux ``VmHWM``), reset afterwards when asked; None where unreadable."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            line = next((line for line in status if line.startswith("VmHWM:")), None)
        if line is None:
            return None
        peak = int(line.split()[1]) * 1024
        if reset:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
                clear.write("5")
        return peak
    except (OSError, ValueError, IndexError):
        return None


class PeakMemoryProbe(Probe):
    """Reads and resets the peaks of the device the trainable parameters live on, once per sampled step."""

    name = "peak_memory"

    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        values = StepValues()
        device = parameter_device(optimizer)
        attributes = {ATTR_DEVICE: str(device)}
        if device.type == "cuda":
            values.gauge(MEMORY_PEAK_ALLOCATED, float(torch.cuda.max_memory_allocated(device)), attributes)
            values.gauge(MEMORY_PEAK_RESERVED, float(torch.cuda.max_memory_reserved(device)), attributes)
            torch.cuda.reset_peak_memory_stats(device)
        elif device.type == "cpu":
            peak = peak_rss(reset=True)
            if peak is not None:
                values.gauge(MEMORY_PEAK_ALLOCATED, float(peak), attributes)
        return values
