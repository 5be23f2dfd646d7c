"""Start torch.distributed for this process from the discovered environment."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from launch.env import DistEnv, discover

log = logging.getLogger(__name__)


def init_distributed(device_type: str, *, timeout_minutes: float = 10.0) -> DistEnv:
    """Initialise the default process group (NCCL on GPUs, gloo on CPU) when more than one process runs.

    The collective timeout is explicit so a hung rank fails the job instead of idling until the wall time
    (`launch.monitor` names the stalled rank and step before it fires). The discovered rank variables are
    exported as torchrun would set them, so libraries that read RANK / LOCAL_RANK agree with us.
    """
    env = discover()
    if env.world_size == 1 or dist.is_initialized():
        return env
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if env.rank == 0:
        log.info("%s: %d processes, rendezvous at %s:%d, collective timeout %.1f min", env.launcher,
                 env.world_size, env.master_addr, env.master_port, timeout_minutes)
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo", init_method="env://", rank=env.rank,
        world_size=env.world_size, timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return env


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
