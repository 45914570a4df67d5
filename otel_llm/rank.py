"""Rank identity of this process in a data-parallel job, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["RankInfo", "rank_info"]


@dataclass(frozen=True)
class RankInfo:
    """Global rank, local rank (within the host) and world size."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def rank_info() -> RankInfo:
    """From an initialised torch.distributed group, else torchrun's environment, else a single process."""
    local_rank = _env_int("LOCAL_RANK", 0)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return RankInfo(dist.get_rank(), local_rank, dist.get_world_size())
    except ImportError:  # pragma: no cover - torch always ships torch.distributed stubs
        pass
    return RankInfo(_env_int("RANK", 0), local_rank, _env_int("WORLD_SIZE", 1))
