"""Pipeline parallelism with `torch.distributed.pipelining`: split the blocks into stages and build a schedule.

A stage is the model itself with the other stages' parts removed (`LanguageModel` skips a missing embedding or
head, and its layers are keyed by global index), so parameter names, and with them checkpoints, are the same
under every layout. Between stages travel the hidden state and, for architectures with a carry (RWKV-7's
first-layer values), the carry as a second tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)
from torch.distributed.tensor import DTensor

from pretrain.config import CHOICES, ConfigError, ParallelConfig

SCHEDULES = CHOICES["parallel.pp_schedule"]


def virtual_stages(cfg: ParallelConfig) -> int:
    """Stages per pipeline process: as configured, else 1 for 1F1B and 2 for the interleaved schedules."""
    return cfg.virtual_stages or (1 if cfg.pp_schedule == "1f1b" else 2)


def split_layers(n_layers: int, n_stages: int, spec: str = "") -> list[range]:
    """Layer indices of each stage: `spec` block counts ('3,5'), or an even split."""
    if spec:
        counts = [int(c) for c in spec.split(",")]
        if len(counts) != n_stages or min(counts) < 1 or sum(counts) != n_layers:
            raise ConfigError(f"parallel.pp_layers='{spec}' must give {n_stages} stages (pp × virtual_stages) at least "
                              f"one block each, {n_layers} (model.n_layers) in all.")
    elif n_layers % n_stages:
        raise ConfigError(f"model.n_layers={n_layers} does not split evenly into pp × virtual_stages = {n_stages} "
                          f"stages; change either, or give the blocks per stage in parallel.pp_layers.")
    else:
        counts = [n_layers // n_stages] * n_stages
    starts = [sum(counts[:i]) for i in range(n_stages)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def stage_indices(pp_rank: int, pp: int, v: int) -> list[int]:
    """The stages pipeline process `pp_rank` holds: looped (rank r holds r, r + pp, …), as the interleaved and
    zero-bubble schedules expect."""
    return [pp_rank + i * pp for i in range(v)]


def make_stage(model: nn.Module, layers: range, *, first: bool, last: bool, carries: bool) -> nn.Module:
    """Cut `model` down, in place, to one stage: its `layers`, the embeddings if `first`, the final norm and head
    if `last`. Its forward then takes (hidden[, carry]) from the previous stage and gives (hidden[, carry]) to
    the next one as plain local tensors; the last stage returns the loss when called with `labels=`."""
    for key in list(model.layers):
        if int(key) not in layers:
            del model.layers[key]
    if not first:
        model.tok_emb = model.pos_emb = None
    if not last:
        model.norm = model.lm_head = None
    blocks = list(model.layers.values())
    box = {}  # the carry on its way from the stage's input to its first block, and from its last block out

    def take_carry(module, args, kwargs):  # (hidden, carry) → LanguageModel.forward(hidden, labels=…)
        box["in"] = args[1]
        return args[:1], kwargs

    def give_outputs(module, args, output):
        hidden = output.to_local() if isinstance(output, DTensor) else output  # (B, T[/tp], d)
        # to_local gives a view, and zero-bubble's split backward detaches stage outputs in place, which a view
        # cannot be: hand on a copy (one activation per micro-batch, small next to the stage's compute)
        hidden = hidden.clone() if hidden._base is not None else hidden
        return (hidden, box.pop("out")) if carries else hidden

    if carries and not first:
        model.register_forward_pre_hook(take_carry, with_kwargs=True)
        blocks[0].register_forward_pre_hook(lambda module, args: (args[0], box.pop("in")))
    if not last:
        if carries:
            blocks[-1].register_forward_hook(lambda module, args, output: box.update(out=output[1]))
        model.register_forward_hook(give_outputs)
    return model


def _loss_of_last_stage(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage already returns its micro-batch's mean loss (it got `labels=`), so the model's own loss
    path (vocab-parallel, mini-sequence chunking) serves; the schedule divides gradients by the micro-batch count."""
    return output


def build_schedule(stages: list[nn.Module], indices: list[int], *, n_stages: int, group: dist.ProcessGroup,
                   device: torch.device, schedule: str, n_microbatches: int):
    """A `torch.distributed.pipelining` schedule over this process's `stages` (global `indices`)."""
    pipeline_stages = [PipelineStage(module, index, n_stages, device, group=group)
                       for module, index in zip(stages, indices)]
    if schedule == "1f1b":
        return Schedule1F1B(pipeline_stages[0], n_microbatches, loss_fn=_loss_of_last_stage)
    cls = {"interleaved_1f1b": ScheduleInterleaved1F1B, "zero_bubble": ScheduleInterleavedZeroBubble}[schedule]
    return cls(pipeline_stages, n_microbatches, loss_fn=_loss_of_last_stage)
