"""Where this process sits in the job: rank, world size, local rank and the rendezvous address.

Pure functions of an environment mapping, so each launcher's discovery is unit-tested from recorded
environments. torchrun is read here; SLURM and MPI discovery build on the same `DistEnv`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"
    """single | torchrun (more launchers add their own names)."""


def from_torchrun(environ: Mapping[str, str]) -> DistEnv | None:
    """torchrun (and `tests/dist.py`) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        return DistEnv(
            rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", "29500")), launcher="torchrun",
        )
    except ValueError as e:
        raise RuntimeError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT): {e}") from None


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The first launcher whose variables are present, else a single process."""
    environ = os.environ if environ is None else environ
    return from_torchrun(environ) or DistEnv()
