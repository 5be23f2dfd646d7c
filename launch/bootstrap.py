"""Start torch.distributed for this process from the discovered environment."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from launch.env import DistEnv, discover


def init_distributed(device_type: str, *, timeout_minutes: float = 10.0) -> DistEnv:
    """Initialise the default process group (NCCL on GPUs, gloo on CPU) when more than one process runs.

    The collective timeout is explicit so a hung rank fails the job instead of idling until the wall time.
    """
    env = discover()
    if env.world_size == 1 or dist.is_initialized():
        return env
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return env


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
