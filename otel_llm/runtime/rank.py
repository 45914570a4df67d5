"""Rank identity of this process in a data-parallel job, in one place."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from otel_llm.config import _at_least, environment_value
from otel_llm.runtime.log_once import once

__all__ = ["MAX_RANK", "RankInfo", "data_parallel_world", "exports", "is_launcher", "rank_info"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    """Global rank, local rank (within the host) and world size."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


MAX_RANK = 2**31 - 1
"""Past any real job: a larger rank is a typo, and base port + local rank must stay a number a socket takes."""


def _rank_variable(name: str, minimum: int, default: int) -> int:
    """torchrun's variable ``name``, or ``default`` with one warning when it is garbage or out of range."""
    return int(environment_value(name, _at_least(minimum, MAX_RANK), default)[0])


def rank_info() -> RankInfo:
    """From an initialised torch.distributed group, else torchrun's environment, else a single process.

    ``LOCAL_RANK`` / ``RANK`` below 0 or ``WORLD_SIZE`` below 1 (or not a number)
    fall back to 0, 0 and 1 with one warning each: a negative local rank would
    otherwise serve on a port below the base.
    """
    local_rank = _rank_variable("LOCAL_RANK", 0, 0)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return RankInfo(dist.get_rank(), local_rank, dist.get_world_size())
    except ImportError:  # pragma: no cover - torch always ships torch.distributed stubs
        pass
    rank, world_size = _rank_variable("RANK", 0, 0), _rank_variable("WORLD_SIZE", 1, 1)
    if rank >= world_size:
        once(_logger, logging.WARNING, ("rank", rank, world_size),
             "otel_llm: RANK=%d is not below WORLD_SIZE=%d; using WORLD_SIZE=%d instead", rank, world_size, rank + 1)
        world_size = rank + 1
    return RankInfo(rank, local_rank, world_size)


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
