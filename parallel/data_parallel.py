"""The data-parallel axis: FSDP2 (`fully_shard`) or DDP (`replicate`, FSDP2's replicated sibling).

Both compose with tensor-parallel DTensor parameters (the dp mesh and the tp mesh are slices of one mesh) and
with pipeline stages, and both are `FSDPModule`s, so gradient accumulation and the pipeline schedules treat
them alike. `replicate` is the DDP that accepts DTensor parameters: `nn.parallel.DistributedDataParallel` does
not.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_data_parallel(model: nn.Module, mesh: DeviceMesh, *, mode: str, reshard_after_forward: bool = True,
                        param_dtype: torch.dtype | None = None) -> None:
    """Wrap each block, then the whole `model`, for the 1-D data-parallel `mesh`, in place.

    mode: "fsdp" shards parameters, gradients and optimizer state over the ranks (each block gathers its
    parameters just before use); "ddp" keeps whole replicas and all-reduces gradients. A block per unit lets
    communication for one block overlap computation of another. `param_dtype` (e.g. bf16) is what forward and
    backward compute in; gradients are reduced and parameters kept in float32.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)

    def wrap(module: nn.Module) -> None:
        if mode == "fsdp":
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        else:
            replicate(module, mesh=mesh, mp_policy=policy)

    for block in model.layers.values():
        wrap(block)
    wrap(model)  # the rest: embeddings, final norm, LM head
    # read by set_gradient_sync: whoever keeps parameters gathered from forward to backward keeps them to the next
    # micro-step too
    model.keep_gathered = mode == "fsdp" and not reshard_after_forward


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduces gradients over dp: only the last micro-step of an accumulation needs to
    (the others accumulate locally). A no-op for a model without data parallelism.

    With FSDP's reshard_after_forward off, parameters also stay gathered from one micro-step's backward to the
    next one's forward and are freed after the last: one all-gather per optimizer step instead of one per
    micro-step (pipeline stages do the same for their micro-batches on their own)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        if getattr(model, "keep_gathered", False):
            model.set_reshard_after_backward(enabled)
