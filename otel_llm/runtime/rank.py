"""Rank identity of this process in a data-parallel job, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["RankInfo", "data_parallel_world", "exports", "is_launcher", "rank_info"]


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


def exports(ranks: RankInfo, policy: str) -> bool:
    """Whether this rank exports under ``policy`` (``all`` or ``zero``)."""
    return policy == "all" or ranks.rank == 0


def is_launcher() -> bool:
    """True in torchrun's own launcher process, which trains nothing and must not take a rank's port."""
    import sys

    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return program == "torchrun" or (program == "run.py" and "torch/distributed" in sys.argv[0].replace("\\", "/"))


def data_parallel_world() -> int:
    """World size of the default process group, 1 when torch.distributed is not initialised.

    Looked up at each use, not once: zero-code sessions start before the script
    calls ``init_process_group``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
