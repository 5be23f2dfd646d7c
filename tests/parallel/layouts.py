"""Train tiny models for a few steps under a layout, with the training loop's own step; compare with one process.

`train_layouts(archs, parallel)` runs inside every rank of `run_distributed` (or in one process without a
process group) and returns, per architecture, the logged losses and the full parameters this rank holds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from parallel.mesh import ParallelDims
from pretrain.checkpoint import Checkpointer
from pretrain.config import build_config
from pretrain.optim import build_optimizer, lr_at
from pretrain.train import build_parallel_model, mean_across_ranks, train_step

ARCHS = ("transformer", "fox", "gla", "rwkv7")
STEPS = 5
TOLERANCE = 1e-5


def tiny_config(arch: str, parallel: dict | None = None, **train):
    """4 blocks (so 2 pipeline ranks × 2 virtual stages get one each), d=32, 4 heads, T=16, an odd vocabulary
    (vocab-parallel shards of unequal size), 2 micro-batches of 4 sequences per step."""
    return build_config({
        "model": {"arch": arch, "d_model": 32, "n_layers": 4, "n_heads": 4, "vocab_size": 67, "seq_len": 16,
                  "pro": arch in ("transformer", "fox")},
        "parallel": parallel or {},
        # Adam turns a gradient g into lr · g / (|g| + eps): with the default eps 1e-8, a gradient at rounding-noise
        # level (~1e-9, e.g. of zero-initialised RWKV-7 projections) makes reduction-order noise an update of
        # several 1e-6; eps 1e-6 keeps it far below the 1e-5 under test.
        "optim": {"lr": 1e-3, "eps": 1e-6, "warmup_steps": 1, "grad_clip": 0.5},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 4, "eval_interval": 0, "seed": 3, **train},
    })


def global_batch(step: int, cfg, documents: bool = False) -> tuple[torch.Tensor, ...]:
    """The step's (tokens, labels), each (global_batch, T): a learnable pattern plus noise, some labels ignored.
    With `documents`, also position ids (global_batch, T) of packed documents: a document starts at each step with
    probability 1/4 (and the rows' first tokens continue a document at a random offset)."""
    g = torch.Generator().manual_seed(step)
    B, T, V = cfg.train.global_batch, cfg.model.seq_len, cfg.model.vocab_size
    start = torch.randint(0, V, (B, 1), generator=g)
    seq = (start + torch.arange(T + 1)) % V  # (B, T + 1): next token = this one + 1
    noise = torch.rand(B, T + 1, generator=g) < 0.2
    seq = torch.where(noise, torch.randint(0, V, (B, T + 1), generator=g), seq)
    labels = seq[:, 1:].clone()
    labels[:, :2] = -100
    if not documents:
        return seq[:, :-1], labels
    starts = torch.rand(B, T, generator=g) < 0.25  # (B, T)
    position_ids = torch.empty(B, T, dtype=torch.long)
    position_ids[:, 0] = torch.where(starts[:, 0], 0, torch.randint(1, 9, (B,), generator=g))
    for t in range(1, T):
        position_ids[:, t] = torch.where(starts[:, t], 0, position_ids[:, t - 1] + 1)
    return seq[:, :-1], labels, position_ids


def local_micro_batches(batch: tuple[torch.Tensor, ...], cfg, *, dp_rank: int, dp: int) -> list[tuple]:
    """This data-parallel rank's rows of a global batch, cut into the step's micro-batches."""
    B = len(batch[0])
    local = [t[dp_rank * B // dp:(dp_rank + 1) * B // dp] for t in batch]
    micro = cfg.train.micro_batch
    return [tuple(t[i:i + micro] for t in local) for i in range(0, len(local[0]), micro)]


def build(cfg, mesh):
    """The training loop's model (this rank's share, initialised from the seed) and its optimizers."""
    model = build_parallel_model(cfg, mesh, device=torch.device("cpu"), param_dtype=None)
    return model, [build_optimizer(part, cfg.optim, torch.device("cpu")) for part in model.parts]


def full_params(model) -> dict[str, np.ndarray]:
    """This rank's parameters by name, unsharded (a collective over each DTensor's mesh)."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().numpy().copy()
            for part in model.parts for name, p in part.named_parameters()}


def train_layouts(archs, parallel: dict, train: dict | None = None, steps: int = STEPS, *,
                  run_dir: str | None = None, stop_after: int | None = None, documents: bool = False,
                  model_overrides: dict | None = None) -> dict[str, tuple]:
    """With `run_dir`: resume from its newest checkpoint (if any), stop after step `stop_after` and save there.
    With `documents`, the batches are packed documents and the model masks them (position ids); `model_overrides`
    replaces model fields."""
    out = {}
    for arch in archs:
        cfg = tiny_config(arch, parallel, **(train or {}))
        if model_overrides:
            cfg.model = dataclasses.replace(cfg.model, **model_overrides)
        out[arch] = train_config(cfg, run_dir=run_dir and f"{run_dir}/{arch}", stop_after=stop_after,
                                 documents=documents, steps=steps)
    return out


def train_config(cfg, *, run_dir: str | None = None, stop_after: int | None = None, documents: bool = False,
                 steps: int = STEPS, dtype: torch.dtype = torch.float32) -> tuple[list[float], dict]:
    """Train `cfg` on this process's share of the layout it names: the logged losses and this rank's full parameters
    (see train_layouts for run_dir, stop_after and documents). `dtype`: the parameters' and activations' dtype (the
    default dtype while the model is built and trained; float64 separates layout bugs from rounding noise)."""
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _train_config(cfg, run_dir=run_dir, stop_after=stop_after, documents=documents, steps=steps)
    finally:
        torch.set_default_dtype(previous_dtype)


def _train_config(cfg, *, run_dir, stop_after, documents, steps) -> tuple[list[float], dict]:
    cfg.data.document_mask = documents  # as the loader's batches would say (context parallelism reads it)
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims.from_config(cfg, world)
    mesh = dims.build_mesh("cpu") if world > 1 else None
    dp_rank = mesh.get_local_rank("dp") if mesh is not None else 0
    model, optimizers = build(cfg, mesh)
    first = 1
    if run_dir is not None:
        ckpt = Checkpointer(cfg.checkpoint, run_dir, run_config=cfg.to_dict())
        resumed = ckpt.load(model=model.parts, optimizer=optimizers)
        first = resumed["step"] + 1 if resumed else 1
    losses = []
    for step in range(first, (stop_after or steps) + 1):
        micro_batches = local_micro_batches(global_batch(step, cfg, documents), cfg, dp_rank=dp_rank, dp=dims.dp)
        loss, _ = train_step(model, optimizers, micro_batches, lr=lr_at(step, cfg.optim, steps),
                             grad_clip=cfg.optim.grad_clip, autocast=torch.autocast("cpu", enabled=False))
        losses.append(mean_across_ranks(loss))
    if run_dir is not None:
        ckpt.save(step, model=model.parts, optimizer=optimizers, state={})
    return losses, full_params(model)


def assert_same_training(results: list[dict], reference: dict, archs, *, params_atol: float = TOLERANCE) -> None:
    """Every rank's losses, and the union of the ranks' parameters (within `params_atol`), equal the single-process
    run's."""
    for arch in archs:
        for losses, _ in (rank_result[arch] for rank_result in results):
            np.testing.assert_allclose(losses, reference[arch][0], rtol=0, atol=TOLERANCE, err_msg=f"{arch} losses")
    assert_same_params(results, reference, archs, atol=params_atol)


def assert_same_params(results: list[dict], reference: dict, archs, *, atol: float = TOLERANCE) -> None:
    for arch in archs:
        ref_params = reference[arch][1]
        params = {name: value for rank_result in results for name, value in rank_result[arch][1].items()}
        assert params.keys() == ref_params.keys(), (arch, params.keys() ^ ref_params.keys())
        for name, value in ref_params.items():
            np.testing.assert_allclose(params[name], value, rtol=0, atol=atol, err_msg=f"{arch} {name}")
