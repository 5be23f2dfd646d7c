"""The one entry the training loop calls: `parallelize(model, cfg, mesh)` lays a model out over the processes
and returns a `ParallelModel`: this process's model parts, the pipeline schedule, and gradient clipping."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from parallel.context import ContextShard
from parallel.context_model import apply_cp
from parallel.data_parallel import apply_data_parallel
from parallel.mesh import data_parallel_mesh
from parallel.pipeline import (build_schedule, log_stage_costs, make_stage, stage_carries, stage_indices, stage_layers,
                               virtual_stages)
from parallel.minisequence import apply_minisequence
from parallel.plans import tp_plan
from parallel.random import apply_dropout_rng
from parallel.recompute import apply_recompute, apply_sp_regather, recompute_modules
from parallel.tensor import apply_tp, reduce_partial_grads
from pretrain.config import Config, ParallelConfig
from pretrain.models.common import InitStep


@dataclass
class ParallelModel:
    """This process's share of the model, and what a training step needs beyond its forward and backward."""

    parts: list[nn.Module]
    """This process's model: the whole of it, or its pipeline stages in stage order."""
    mesh: DeviceMesh | None = None
    """The (pp, dp_replicate, dp_shard, cp, tp) mesh with its flattened axes (parallel.mesh); None for one process."""
    schedule: object | None = None
    """The pipeline schedule when pp > 1: it runs every micro-batch's forward and backward."""
    microbatches: int = 1
    """Micro-batches the schedule runs per call."""
    context: ContextShard | None = None
    """This rank's part of every sequence under context parallelism (parallel.cp > 1), else None."""
    documents: bool = False
    """Whether batches carry in-document position ids (data.document_mask)."""

    def parameters(self):
        return (p for part in self.parts for p in part.parameters())

    def local_batch(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A loader batch (tokens, labels[, position_ids]), each (B, T), as this rank computes it: under context
        parallelism its part of every row (B, T / cp), with position ids always (the global positions without
        document masking), so positional encodings and token shifts know where its steps are; else unchanged."""
        if self.context is None:
            return batch
        if (len(batch) == 3) != self.documents:  # the model's mask was told which (parallel.context_model)
            raise ValueError(f"context parallelism was set up {'with' if self.documents else 'without'} document "
                             f"masking (data.document_mask) but got a batch {'without' if self.documents else 'with'} "
                             f"position ids")
        local = [self.context.split(t, dim=1) for t in batch]  # (B, T / cp) each
        if len(batch) == 2:  # no document masking: the global positions of this rank's steps
            tokens = batch[0]
            local.append(self.context.positions(tokens.shape[1], tokens.device).expand(tokens.shape[0], -1))
        return tuple(local)

    def pipeline_step(self, micro_batches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Forward (and backward, unless gradients are disabled) of every micro-batch (tokens, labels[,
        position_ids]) through the pipeline; returns their mean loss on every stage."""
        # (n · micro, T) each: the schedule splits them into micro-batches again
        tokens, labels, *position_ids = (torch.cat(parts) for parts in zip(*micro_batches))
        losses = []
        run = self.schedule.step if torch.is_grad_enabled() else self.schedule.eval
        # keyword arguments reach every stage: labels= is used by the last (it has the head), position_ids= by all
        run(tokens, target=labels, losses=losses, return_outputs=False, labels=labels,
            position_ids=position_ids[0] if position_ids else None)
        loss = torch.stack(losses).mean() if losses else torch.zeros((), device=tokens.device)
        dist.all_reduce(loss, group=self.mesh.get_group("pp"))  # zero on the other stages
        return loss.detach()

    @torch.no_grad()
    def pipeline_eval(self, batches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Mean loss over `batches`, taken as many micro-batches at a time as the schedule runs."""
        n = self.microbatches
        return torch.stack([self.pipeline_step(batches[i:i + n]) for i in range(0, len(batches), n)]).mean()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so their global L2 norm is at most `max_norm` (0 = only measure); return the norm.

        The norm spans every shard and stage: tensor-parallel partial gradients are summed first (FSDP has done
        its own), each DTensor's squares are summed over the ranks that shard it (not those that replicate it),
        and the stages' sums over the pipeline. Gradients are handled in groups of one layout and dtype, each with
        one foreach kernel for its norms and one for its scaling, not one DTensor op per parameter.
        """
        params = [p for p in self.parameters() if p.grad is not None]
        reduce_partial_grads(params)
        groups = _local_grads_by_layout([p.grad for p in params])
        norm = _sum_of_squares(groups, device=next(self.parameters()).device)
        if self.mesh is not None and self.mesh["pp"].size() > 1:
            dist.all_reduce(norm, group=self.mesh.get_group("pp"))
        norm = norm.sqrt()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for grads in groups.values():
                torch._foreach_mul_(grads, scale)
        return norm


def _local_grads_by_layout(grads: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """This process's part of each gradient (a DTensor's local shard), grouped by (mesh, the mesh dims that shard
    it, dtype); plain tensors under (None, (), dtype)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            # summed over the mesh dims that shard g (TP's Shard, FSDP's _StridedShard), not over its replicas
            key = (g.device_mesh, tuple(i for i, p in enumerate(g.placements) if not p.is_replicate()), g.dtype)
            g = g.to_local()
        else:
            key = (None, (), g.dtype)
        groups.setdefault(key, []).append(g)
    return groups


def _sum_of_squares(groups: dict[tuple, list[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Σ g² over the full (unsharded) gradients of `_local_grads_by_layout`'s groups, in fp32 or wider: one foreach
    norm per group and one all-reduce per sharded mesh dim of each layout."""
    by_layout: dict[tuple, torch.Tensor] = {}
    for (mesh, sharded_dims, dtype), local in groups.items():
        # fp32 for bf16/fp16 gradients; fp64 ones keep their precision (foreach_norm refuses to narrow them)
        squares = torch.stack(torch._foreach_norm(local, 2.0, dtype=torch.promote_types(dtype, torch.float32)))
        squares = squares.square().sum()
        by_layout[mesh, sharded_dims] = by_layout.get((mesh, sharded_dims), 0) + squares
    total = torch.zeros((), device=device)
    for (mesh, sharded_dims), local in by_layout.items():
        for dim in sharded_dims:
            dist.all_reduce(local, group=mesh.get_group(dim))
        total = total + local  # not in place: the sum takes the widest dtype (fp64 gradients stay fp64)
    return total


def _save_activation_memory(part: nn.Module, p: ParallelConfig) -> None:
    """Activation recomputation and mini-sequence chunking, as `cfg.parallel` asks."""
    apply_recompute(part, p.recompute, modules=recompute_modules(p.recompute_modules), every=p.recompute_every,
                    first=p.recompute_first or None)
    apply_minisequence(part, p.minisequence_chunks)


def parallelize(model: nn.Module, cfg: Config, mesh: DeviceMesh | None, *, device: torch.device,
                param_dtype: torch.dtype | None = None) -> ParallelModel:
    """Lay the full `model` out over `mesh` as `cfg.parallel` says, with its weights on `device`.

    A `model` on the meta device is laid out there, then only this process's shards are allocated and initialised:
    to the weights `model.init_weights()` gives the whole model on one process from the default generator's
    current state (the caller seeds it), whatever the layout. A materialised `model` (the same weights on every
    process) has its weights copied shard by shard. `param_dtype` (e.g. bf16) is the compute dtype under FSDP's
    mixed precision. Without a mesh (one process) the model itself is used, initialised first if on meta.
    """
    p = cfg.parallel
    if mesh is None:
        if _on_meta(model):
            _to_empty(model, device)
            model.init_weights()
        _save_activation_memory(model, p)
        if p.compile and device.type == "cuda":  # as step 4 below: one process compiles its blocks too
            for block in model.layers.values():
                block.compile()
        return ParallelModel([model])
    dp_mesh = data_parallel_mesh(mesh)  # dp × cp ranks: gradients are reduced over cp too
    pp, cp, tp = mesh["pp"].size(), mesh["cp"].size(), mesh["tp"].size()
    dp = mesh["dp_replicate"].size() * mesh["dp_shard"].size()  # model replicas reading different batches
    context = ContextShard.from_group(mesh.get_group("cp")) if cp > 1 else None
    # 1. Pipeline split first, on meta copies of the model (no memory): every later step then touches only the
    #    modules this process keeps, and each stage holds only its parts when it is materialised in 6.
    parts, indices = [_meta_copy(model)], [0]
    if pp > 1:
        v = virtual_stages(p)
        layers = stage_layers(cfg.model, pp * v, p.pp_layers)
        log_stage_costs(cfg.model, layers)
        indices = stage_indices(mesh["pp"].get_local_rank(), pp, v)
        parts = [make_stage(_meta_copy(model), layers[i], first=i == 0, last=i == pp * v - 1,
                            carries=stage_carries(cfg.model, layers[i])) for i in indices]
    for part in parts:
        # 2. Tensor parallel: it changes parameters' shapes and layouts, so it precedes anything that wraps them.
        if tp > 1:
            apply_tp(part, mesh["tp"], tp_plan(cfg.model, sequence_parallel=p.sequence_parallel))
        #    Context parallelism replaces each mixer's core op (`attend`) and wraps the loss: after TP, whose styles
        #    hand the mixers their local heads and whose vocab-parallel loss it wraps; before recomputation, which
        #    then checkpoints the CP `attend` (its ring or scan runs again in backward) and the blocks around it.
        if context is not None:
            apply_cp(part, context, documents=cfg.data.document_mask)
        if tp > 1:
            apply_dropout_rng(part, mesh["tp"])  # dropout on DTensors: explicit streams, never DTensor's tracker
        # 3. Activation recomputation and mini-sequence chunking wrap the blocks once their layout is final,
        #    inside FSDP's hooks (added in 5.), which then gather parameters again for the recomputed forward.
        _save_activation_memory(part, p)
        #    Under SP, mixers and MLPs then keep their input's sequence shard, not the gathered whole: after TP, whose
        #    all-gather hook they follow, and after recomputation, whose checkpoints they leave alone. Not compiled
        #    (untested there: the compiled graph saves its own tensors).
        compiled = p.compile and device.type == "cuda"
        if tp > 1 and p.sequence_parallel and p.sp_regather and not compiled:
            apply_sp_regather(part)
        # 4. Compile each block (CUDA): after TP, so the graph holds the DTensor program; before data
        #    parallelism, so FSDP's hooks stay outside it.
        if compiled:
            for block in part.layers.values():
                block.compile()
        # 5. Data parallelism last: it shards or replicates the final parameters, DTensors included.
        if dp_mesh.size() > 1:
            apply_data_parallel(part, dp_mesh, mode=p.data_parallel, param_dtype=param_dtype,
                                reshard_after_forward=p.reshard_after_forward,
                                reduce_every_micro_step=p.fsdp_reduce_every_micro_step)
    # 6. Only now is memory allocated: this process's shards, holding the initial (or the given) weights.
    materialize(parts, model, device=device)
    if pp == 1:
        return ParallelModel(parts, mesh, context=context, documents=cfg.data.document_mask)
    # 7. The schedule drives the finished stages, a step's micro-batches at a time.
    n_microbatches = cfg.train.micro_batches_per_step(dp)
    schedule = build_schedule(parts, indices, n_stages=pp * virtual_stages(p), group=mesh.get_group("pp"),
                              device=device, schedule=p.pp_schedule, n_microbatches=n_microbatches)
    return ParallelModel(parts, mesh, schedule, n_microbatches, context=context, documents=cfg.data.document_mask)


def _on_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in model.parameters())


def _to_empty(model: nn.Module, device: torch.device) -> None:
    """`model.to_empty(device=device)` keeping a parameter two submodules share (tied embeddings) shared: a plain
    `to_empty` from meta gives each submodule a parameter of its own. Swapping each parameter's contents in place
    keeps every reference to it."""
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device: no memory, and no weights copied (a tied weight
    stays tied)."""
    memo = {id(param): nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
            for param in model.parameters()}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def materialize(parts: list[nn.Module], source: nn.Module, *, device: torch.device) -> None:
    """Allocate the parameters of `parts` (laid out on meta) on `device` and give them `source`'s weights.

    `source` is the full model. On meta, its `init_steps()` run in order, each on a full-size copy of just the
    parameters it writes, on `device`; a step this process keeps nothing of runs too, so every process draws the
    same random numbers in the same order as one process initialising the whole model. Materialised, its weights
    are read. Of each full tensor this process keeps its shards: beyond them, one parameter at a time is whole here.
    """
    targets = {}  # parameter name → this process's parameter (a DTensor when sharded); a tied weight under both names
    for part in parts:
        _to_empty(part, device)  # FSDP re-registers its padded shards here
        targets.update(part.named_parameters(remove_duplicate=False))
    if not _on_meta(source):
        for name, full in source.named_parameters(remove_duplicate=False):
            _keep_shard(targets.get(name), full)
        return
    for name, init in source.init_steps():
        _run_init_step(source.get_submodule(name), init, name=name, targets=targets, device=device)


def _run_init_step(module: nn.Module, init: InitStep, *, name: str, targets: dict[str, torch.Tensor],
                   device: torch.device) -> None:
    """One init step on a copy of `module` (meta) whose own parameters are full size on `device`; keep the shards.
    The copy is freed on return, before the next step allocates its own."""
    module = copy.deepcopy(module).to_empty(device=device, recurse=False)  # its children stay on meta
    init(module)
    for param_name, full in module.named_parameters(prefix=name, recurse=False):
        _keep_shard(targets.get(param_name), full)


def _keep_shard(target: torch.Tensor | None, full: torch.Tensor) -> None:
    """Copy this process's part of the full tensor `full` into `target`: its local shard if a DTensor, all of it if
    a plain tensor; nothing if None (a parameter of another pipeline stage)."""
    if isinstance(target, DTensor):
        # the block of `full` the local shard holds (DCP's description of it, _StridedShard included): copied from a
        # view of `full`, so nothing beyond the full tensor is allocated
        (chunk,) = target.__create_chunk_list__()
        full = full[tuple(slice(offset, offset + size) for offset, size in zip(chunk.offsets, chunk.sizes))]
        target = target.to_local()
    if target is not None:
        target.copy_(full)
