"""#17 memory pressure, read on the host at publish time."""

from __future__ import annotations

import os

import torch

__all__ = ["memory_pressure"]


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
