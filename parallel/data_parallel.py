"""The data-parallel axis: DDP for now (FSDP2 arrives with the parallelism work)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    # Parameters are identical on every rank already (same seed), and DDP broadcasts rank 0's anyway.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
