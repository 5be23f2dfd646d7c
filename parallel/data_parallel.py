"""The data-parallel axis: FSDP2 (`fully_shard`) or DDP (`replicate`, FSDP2's replicated sibling).

Both compose with tensor-parallel DTensor parameters (the dp mesh and the tp mesh are slices of one mesh) and
with pipeline stages, and both are `FSDPModule`s, so gradient accumulation and the pipeline schedules treat
them alike. `replicate` is the DDP that accepts DTensor parameters: `nn.parallel.DistributedDataParallel` does
not.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed._composable.replicate_with_fsdp import ReplicateModule, replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_data_parallel(model: nn.Module, mesh: DeviceMesh, *, mode: str, reshard_after_forward: bool = True,
                        reduce_every_micro_step: bool = True, param_dtype: torch.dtype | None = None) -> None:
    """Wrap each block, then the whole `model`, for the data-parallel `mesh`, in place.

    mode: "fsdp" shards parameters, gradients and optimizer state over the ranks (each block gathers its
    parameters just before use); "ddp" keeps whole replicas and all-reduces gradients. A 2-D `mesh`
    (dp_replicate, dp_shard) makes FSDP hybrid (HSDP): sharded over the second axis, replicated over the first.
    Under context parallelism the mesh spans the cp ranks too (`parallel.mesh.data_parallel_mesh`): they hold the
    same parameters and other tokens, so their gradients are reduced with the data-parallel ones.
    A block per unit lets communication for one block overlap computation of another. `param_dtype` (e.g. bf16)
    is what forward and backward compute in; gradients are reduced and parameters kept in float32.
    `reduce_every_micro_step` (FSDP): see `set_gradient_sync`.
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
    # read by set_gradient_sync at every micro-step
    model.keep_gathered = mode == "fsdp" and not reshard_after_forward
    model.reduce_every_micro_step = mode == "fsdp" and reduce_every_micro_step


def set_gradient_sync(model: nn.Module, *, last_micro_step: bool) -> None:
    """Set how the next backward reduces gradients over dp, given whether it is the optimizer step's last
    micro-step. A no-op for a model without data parallelism.

    FSDP by default reduce-scatters every micro-step's gradients at once, so each rank only ever accumulates
    its shard (1/dp_shard of the model's fp32 gradients, plus the block being reduced); under HSDP the shards
    are all-reduced over the replicas only after the last micro-step (FSDP keeps the partial sums sharded).
    With `reduce_every_micro_step` off (and always for DDP) ranks accumulate whole unsharded gradients locally
    and reduce once, after the last: 1/m of the gradient traffic for a full model of gradients per rank.

    With FSDP's reshard_after_forward off, parameters also stay gathered from one micro-step's backward to the
    next one's forward and are freed after the last: one all-gather per optimizer step instead of one per
    micro-step. Pipeline stages are not called here: torch's schedules keep their gradients unsharded across a step's
    micro-batches on their own, and reduce once (zero bubble also needs `keep_parameters_gathered`)."""
    if not isinstance(model, FSDPModule):
        return
    if getattr(model, "reduce_every_micro_step", False):
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(last_micro_step)
    else:
        model.set_requires_gradient_sync(last_micro_step)
    if getattr(model, "keep_gathered", False):
        model.set_reshard_after_backward(last_micro_step)


def keep_parameters_gathered(model: nn.Module) -> None:
    """Turn FSDP's reshard_after_forward off for `model` and every FSDP unit inside it: parameters gathered for a
    forward stay gathered, and registered on their modules, until something reshards them (the backward's end when
    reshard_after_backward is on, or an explicit `reshard()`). A no-op without FSDP; DDP keeps whole parameters anyway.

    The zero-bubble pipeline schedule needs it (`parallel.pipeline.build_schedule`). Its cost: a stage's parameters
    stay whole, in compute dtype, through the step, next to the whole fp32 gradients every pipeline schedule already
    accumulates for it until the step's reduction; its all-gathers drop to one per step."""
    if isinstance(model, FSDPModule) and not isinstance(model, ReplicateModule):
        model.set_reshard_after_forward(False)
