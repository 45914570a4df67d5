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


_LAUNCHER_SCRIPTS = ("torchrun", "deepspeed")
_LAUNCHER_MODULES = ("torch.distributed.run", "deepspeed.launcher.launch", "deepspeed.launcher.runner")


def is_launcher() -> bool:
    """True in a launcher process (torchrun, the deepspeed launcher), which trains nothing and must not take a
    rank's port.

    Read from the interpreter's own command line: while ``site`` runs (zero code),
    ``python -m module`` still has ``-m`` as ``sys.argv[0]``.
    """
    import sys

    command = list(getattr(sys, "orig_argv", sys.argv))
    if "-m" in command[:-1]:
        module = command[command.index("-m") + 1]
        return module in _LAUNCHER_MODULES
    script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-m") else ""
    if not script:
        return False
    script = script.replace("\\", "/")
    return os.path.basename(script) in _LAUNCHER_SCRIPTS or script.endswith(
        tuple(module.replace(".", "/") + ".py" for module in _LAUNCHER_MODULES))


def data_parallel_world() -> int:
    """World size of the default process group, 1 when torch.distributed is not initialised.

    Looked up at each use, not once: zero-code sessions start before the script
    calls ``init_process_group``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
