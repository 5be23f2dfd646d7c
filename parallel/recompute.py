"""Activation recomputation: keep less for backward and run parts of the forward again (Korthikanti et al. 2022).

`apply_recompute(model, mode)` with mode
- "none": nothing changes.
- "selective": recompute what is cheap to recompute and expensive to keep: every mixer's `attend`, its core op.
  Softmax attention (transformer, FoX): scores, softmax, dropout, · v, whose (B, H, T, T) tensors dominate.
  GLA and RWKV-7: the chunked recurrence, whose intra-chunk tensors (decay-weighted scores, per-chunk states,
  RWKV-7's per-chunk corrections) are several times the size of its inputs; the projections, gates and output
  norm around it keep their activations. `modules` adds block submodules by name, like megatron-core's
  `recompute_modules`: "mlp", "norm" (the block's norms) or any attribute name of the block ("attn_norm").
- "full": each chosen block keeps only its input (2sbh bytes in bf16) and runs again in backward.

Wrappers replace methods on the instance, so parameter names and state-dict keys do not change. A whole block
checkpoints its `forward`: the hooks on the block itself (FSDP2's, the pipeline stage's carry hand-over) stay
outside and run once. A selected submodule checkpoints its whole call (`_call_impl`), its hooks included: tensor
parallelism's hooks swap in local views of parameters and gather sequence shards, and the recomputed forward
needs them again. The RNG state is saved and restored, so dropout draws the same masks when the forward runs again.

`apply_sp_regather(model)` (sequence parallelism, `parallel.sp_regather`): each mixer and MLP keeps its input's
sequence shard instead of the all-gathered whole and gathers it again in backward, as Megatron does
(`tensor.keep_input_shard`); blocks and submodules that are checkpointed already keep only their input and are left.
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from parallel.tensor import keep_input_shard

MODES = ("none", "selective", "full")
NORMS = ("emb_norm", "attn_norm", "mlp_norm")


def checkpoint_method(obj: nn.Module, name: str = "forward") -> None:
    """Make `obj.<name>(...)` save only its inputs and run again in backward."""
    method = getattr(obj, name)
    setattr(obj, name, functools.partial(checkpoint, method, use_reentrant=False, preserve_rng_state=True))


def apply_recompute(model: nn.Module, mode: str, *, modules: tuple[str, ...] = (), every: int = 1,
                    first: int | None = None) -> None:
    """Recompute activations of `model.layers` (a stage's share under pipelining) as `mode` says, in place.

    full: the blocks whose layer index i has i % every == 0 and, if `first` is given, i < first. Indices are the
    model's, so pipeline stages choose the same blocks a single process would.
    """
    if mode not in MODES:
        raise ValueError(f"recompute mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return
    for key, block in model.layers.items():
        if mode == "full":
            if int(key) % every == 0 and (first is None or int(key) < first):
                checkpoint_method(block)
            continue
        checkpoint_method(block.mixer, "attend")
        for name in modules:
            names = [n for n in NORMS if getattr(block, n, None) is not None] if name == "norm" else [name]
            for n in names:
                sub = getattr(block, n, None)
                if not isinstance(sub, nn.Module):
                    raise ValueError(f"recompute module {name!r}: block {key} has no submodule {n!r}; "
                                     f"use 'mlp', 'norm' or a submodule name of the block")
                checkpoint_method(sub, "_call_impl")


def is_checkpointed(obj: nn.Module, name: str) -> bool:
    """Whether `checkpoint_method(obj, name)` wrapped it."""
    return getattr(obj.__dict__.get(name), "func", None) is checkpoint


def apply_sp_regather(model: nn.Module) -> None:
    """Under sequence parallelism (after `apply_tp` and `apply_recompute`): every mixer and MLP of `model.layers`
    keeps its input's sequence shard for backward, not the gathered whole, unless a checkpoint covers it."""
    for block in model.layers.values():
        if is_checkpointed(block, "forward"):
            continue  # full recomputation keeps only the block's input
        for module in (block.mixer, block.mlp):
            if not is_checkpointed(module, "_call_impl"):
                keep_input_shard(module)


def recompute_modules(names: str) -> tuple[str, ...]:
    """'mlp, norm' → ('mlp', 'norm')."""
    return tuple(n.strip() for n in names.split(",") if n.strip())
