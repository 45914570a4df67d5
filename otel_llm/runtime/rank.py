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
