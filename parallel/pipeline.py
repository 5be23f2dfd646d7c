"""Pipeline parallelism with `torch.distributed.pipelining`: split the blocks into stages and build a schedule.

A stage is the model itself with the other stages' parts removed (`LanguageModel` skips a missing embedding or
head, and its layers are keyed by global index), so parameter names, and with them checkpoints, are the same
under every layout. Between stages travel the hidden state and, for models with a carry (RWKV-7's first-layer
values), the carry as a second tensor, from the stage holding the first carrying layer on.

Stages are contiguous runs of layers: `parallel.pp_layers` if given, else an even split for a pure model, and for a
hybrid (whose layers differ in cost) the split that minimises the most expensive stage by `pretrain.metrics`'
FLOPs per token of each layer, the LM head's counted on the last stage (`stage_layers`, `balance_layers`).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)
from torch.distributed.tensor import DTensor

from parallel.data_parallel import keep_parameters_gathered
from parallel.plans import CARRY_ARCHS
from pretrain.config import CHOICES, ConfigError, ModelConfig, ParallelConfig, layer_mixers

SCHEDULES = CHOICES["parallel.pp_schedule"]
log = logging.getLogger("pretrain")


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


def stage_layers(model: ModelConfig, n_stages: int, spec: str = "") -> list[range]:
    """Layer indices of each of `n_stages` stages: the `spec` block counts (parallel.pp_layers) if given, else an even
    split for a pure model and a split balanced by FLOPs per token (`balance_layers`) for a hybrid."""
    if spec or model.arch != "hybrid":
        return split_layers(model.n_layers, n_stages, spec)
    costs, head = layer_costs(model)
    return balance_layers(costs, n_stages, last_extra=head)


def layer_costs(model: ModelConfig) -> tuple[list[float], float]:
    """(training FLOPs per token of each layer, of the LM head): what stage balancing weighs."""
    from pretrain.metrics import flops_by_layer  # builds the model on meta: imported only where costs are needed

    return flops_by_layer(model)


def balance_layers(costs: list[float], n_stages: int, *, first_extra: float = 0.0,
                   last_extra: float = 0.0) -> list[range]:
    """Contiguous stages of at least one layer each that minimise the most expensive stage, a stage's cost being the
    sum of its layers' `costs` (plus `first_extra` on the first stage, `last_extra` on the last: the embedding and
    the LM head). Among splits with the same maximum, the one with the smallest sum of squared stage costs (the
    most even) wins. Exact, by dynamic programming over (stages, layers): O(n_stages · L²) for L layers."""
    L = len(costs)
    if not 1 <= n_stages <= L:
        raise ConfigError(f"{L} layers cannot fill {n_stages} pipeline stages (pp × virtual_stages) of at least one "
                          f"block each; lower parallel.pp or parallel.virtual_stages.")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(start: int, stop: int, k: int) -> float:
        return (prefix[stop] - prefix[start] + (first_extra if k == 0 else 0.0)
                + (last_extra if k == n_stages - 1 else 0.0))

    # best[k][j]: (max, sum of squares, previous cut) of the best split of layers [0, j) into stages 0..k
    best = [[None] * (L + 1) for _ in range(n_stages)]
    for j in range(1, L - n_stages + 2):
        c = stage_cost(0, j, 0)
        best[0][j] = (c, c * c, 0)
    for k in range(1, n_stages):
        for j in range(k + 1, L - n_stages + k + 2):
            options = []
            for i in range(k, j):  # stage k holds layers [i, j); stages 0..k-1 the best split of [0, i)
                c = stage_cost(i, j, k)
                peak, squares, _ = best[k - 1][i]
                options.append((max(peak, c), squares + c * c, i))
            best[k][j] = min(options)
    cuts, j = [L], L
    for k in range(n_stages - 1, 0, -1):
        j = best[k][j][2]
        cuts.append(j)
    cuts.append(0)
    cuts.reverse()
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def stage_imbalance(layers: list[range], costs: list[float], *, first_extra: float = 0.0,
                    last_extra: float = 0.0) -> float:
    """The most expensive stage's cost over the mean stage cost (1.0: perfectly balanced): the pipeline's predicted
    slowdown against an ideal split, since every stage waits for the slowest."""
    totals = [sum(costs[i] for i in r) for r in layers]
    totals[0] += first_extra
    totals[-1] += last_extra
    return max(totals) / (sum(totals) / len(totals))


def log_stage_costs(model: ModelConfig, layers: list[range]) -> None:
    """Log (rank 0) a hybrid's stages with their predicted FLOPs-per-token shares and the imbalance they predict."""
    if model.arch != "hybrid" or dist.get_rank() != 0:
        return
    costs, head = layer_costs(model)
    total = sum(costs) + head
    stage_totals = [sum(costs[i] for i in r) for r in layers]
    stage_totals[-1] += head
    shares = ", ".join(f"{r.start}-{r.stop - 1}: {cost / total:.1%}" for r, cost in zip(layers, stage_totals))
    log.info("pipeline stages of %s (layers: share of FLOPs per token): %s; predicted imbalance %.3f (slowest stage "
             "over the mean)", model.mixers, shares, stage_imbalance(layers, costs, last_extra=head))


def stage_carries(model: ModelConfig, layers: range) -> tuple[bool, bool]:
    """(takes, gives): whether the stage of `layers` takes a carry from the previous stage and hands one to the next.
    The carry exists from the first layer whose mixer makes one (RWKV-7) to the end of the model."""
    mixers = layer_mixers(model)
    source = next((i for i, mixer in enumerate(mixers) if mixer in CARRY_ARCHS), None)
    if source is None:
        return False, False
    return layers.start > source, layers.stop - 1 >= source


def stage_indices(pp_rank: int, pp: int, v: int) -> list[int]:
    """The stages pipeline process `pp_rank` holds: looped (rank r holds r, r + pp, …), as the interleaved and
    zero-bubble schedules expect."""
    return [pp_rank + i * pp for i in range(v)]


def make_stage(model: nn.Module, layers: range, *, first: bool, last: bool, carries: tuple[bool, bool]) -> nn.Module:
    """Cut `model` down, in place, to one stage: its `layers`, the embeddings if `first`, the final norm and head
    if `last`. Its forward then takes (hidden[, carry]) from the previous stage and gives (hidden[, carry]) to
    the next one as plain local tensors; the last stage returns the loss when called with `labels=`. `carries`:
    (takes, gives), whether a carry comes in from the previous stage and goes out to the next (`stage_carries`)."""
    takes, gives = carries
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
        return (hidden, box.pop("out")) if gives else hidden

    if takes and not first:
        model.register_forward_pre_hook(take_carry, with_kwargs=True)
        blocks[0].register_forward_pre_hook(lambda module, args: (args[0], box.pop("in")))
    if not last:
        if gives:
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
    if schedule == "zero_bubble":
        # Zero bubble splits each backward: the input-gradient pass (B) takes the stage's registered parameters as
        # the weights whose autograd leaves it keeps for the weight-gradient pass (W). Under FSDP the leaves are the
        # gathered parameters, registered only while gathered; once FSDP resharded a block after its forward, B saw
        # the sharded ones, found none in the graph, and that block's weight gradients were silently lost. Kept
        # gathered, they stay registered from the schedule's UNSHARD of the stage to its RESHARD after the step.
        for module in stages:
            keep_parameters_gathered(module)
    return cls(pipeline_stages, n_microbatches, loss_fn=_loss_of_last_stage)
