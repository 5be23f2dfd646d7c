"""Dropout randomness under every layout: which masks must differ, which must agree, and where they come from.

The rules (Megatron-LM's, Korthikanti et al. 2022, with one change noted in 1):
1. Data-parallel replicas draw different masks. They hold different samples, and the single-process run they
   stand for draws a fresh mask for every sample. (Megatron-LM shares the tensor-parallel masks across replicas
   unless told `--data-parallel-random-init`; here they always differ, as per-rank seeds made them before.)
2. Pipeline stages draw from streams of their own: they hold different layers, so nothing needs to agree.
3. Tensor-parallel ranks agree where they hold the same values. Without sequence parallelism the residual stream
   (the embedding dropout, each block's residual-branch dropout) is `Replicate()` over the tp ranks: each applies
   the same mask, or the copies of one stream drift apart while the DTensor still says they are equal.
4. They differ where they hold different values: under sequence parallelism the residual stream's sequence shards
   (other tokens), and whatever a mixer's core op (`attend`) draws, which acts on this rank's heads (the
   Transformer's attention-probability dropout): other heads, other masks.
5. A recomputed forward (selective or full recomputation) draws the masks of the forward it replays.

How, with no collective and nothing that waits on the host:
- Each process has one stream per optimizer step: torch's default generators (CPU, and the accelerator's), which
  `seed_streams` seeds at the start of every step with `stream_seed(train.seed, mesh, step=step)`, a function of
  the step and of every mesh coordinate except the tensor-parallel one (pp stage, dp replica, and any axis added
  later that holds other data). The tp ranks of a replica and stage so start each step equal, and since they run
  the same ops on same-shaped tensors they stay equal: replicated regions draw from the stream itself (rule 3),
  and replicas and stages differ (rules 1, 2).
- A sharded region (`sharded_region`) takes one number from the stream, on the CPU (no device sync), the same on
  every tp rank; mixes in the index of the shard this rank holds; seeds the device's generator with it for the
  region's draws; and then puts the generator back. Shards get different masks (rule 4), and every tp rank's
  stream moves by that one number, whatever the region drew, so the streams stay equal.
- Activation checkpointing (`preserve_rng_state=True`) saves and restores the default generators, the region's
  seed included, so a recomputed forward replays its masks (rule 5).
- A step's masks depend on nothing but (train.seed, step, coordinates): a resumed run draws the masks of a run
  straight through, also when it resumes under another layout, where the generator states a checkpoint restores
  per rank were drawn for other coordinates (a dp2 checkpoint resumed as tp2 would otherwise give the two tp ranks
  different states, and the replicated residual different masks).
- Under tensor parallelism `apply_dropout_rng` makes dropout on a DTensor run on its local tensor. DTensor's own
  random-op path is then never taken: on CUDA its first use creates the `OffsetBasedRNGTracker`, which broadcasts
  rank 0's generator state over the whole world and waits for it on the host (torch 2.13's
  `distributed/tensor/_random.py` and `_dispatch.py`; read there, not seen on a GPU: under pipelining stage 0
  blocks in its first forward while later stages wait for its activations, and otherwise every replica draws rank
  0's masks from then on). On CPU that tracker is not supported, and each rank drew from its own generator, so a
  `Replicate()` residual silently differed across the tp ranks (tests/parallel/test_dropout_rng.py).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

TP_AXIS = "tp"

# An odd 64-bit constant (2^64 / golden ratio): index ↦ index · _SPREAD is a bijection modulo 2^32 as well as 2^64,
# so seeds offset by distinct indices differ in their low 32 bits, the only ones the CPU generator's Mersenne
# Twister uses (torch.manual_seed(s) and manual_seed(s + 2^32) give the same CPU stream).
_SPREAD = 0x9E3779B97F4A7C15


def seed_streams(seed: int, mesh: DeviceMesh | None, *, step: int, device: torch.device) -> None:
    """Seed this process's stream for optimizer step `step`: the CPU generator and `device`'s (see the rules)."""
    seed = stream_seed(seed, mesh, step=step)
    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        _default_generator(device).manual_seed(seed)


def stream_seed(seed: int, mesh: DeviceMesh | None, *, step: int) -> int:
    """The seed of this process's random stream in optimizer step `step`: the same for the tensor-parallel ranks of
    one data-parallel replica and pipeline stage, different (also in its low 32 bits) for every other coordinate."""
    index = 0  # the coordinate on every axis but tp, as one number
    if mesh is not None:
        for name, size, coordinate in zip(mesh.mesh_dim_names, mesh.shape, mesh.get_coordinate()):
            if name != TP_AXIS:
                index = index * size + coordinate
    # hashed, so that neighbouring seeds and steps do not give overlapping sets of streams
    base = int.from_bytes(hashlib.blake2b(f"stream {seed} {step}".encode(), digest_size=8).digest(), "little")
    return _spread(base, index)


def _spread(base: int, index: int) -> int:
    return (base + index * _SPREAD) % 2**64


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    module = torch.get_device_module(device.type)
    return module.default_generators[module.current_device() if device.index is None else device.index]


@contextlib.contextmanager
def sharded_region(shard_index: int, device: torch.device) -> Iterator[None]:
    """Random ops inside draw from `device`'s generator seeded for shard `shard_index` of this step of the stream:
    different masks for different shards, and the stream advanced by one number on every rank alike."""
    drawn = int(torch.randint(2**63 - 1, ()))  # from the CPU generator: no device sync on accelerators
    generator = _default_generator(device)
    state = generator.get_state()
    generator.manual_seed(_spread(drawn, shard_index))
    try:
        yield
    finally:
        generator.set_state(state)


def _region(x: DTensor) -> contextlib.AbstractContextManager:
    """The region a random op on `x` belongs to: replicated (the stream itself) unless some mesh axis shards x; then
    a sharded region whose index names the shard this rank holds (ranks holding the same shard draw alike)."""
    index, sharded = 0, False
    for axis, placement in enumerate(x.placements):
        if placement.is_shard():
            index = index * x.device_mesh.size(axis) + x.device_mesh.get_local_rank(axis)
            sharded = True
    # Partial counts as replicated: dropout with one mask is linear, so masking the summands masks the sum
    return sharded_region(index, x.device) if sharded else contextlib.nullcontext()


def apply_dropout_rng(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Under tensor parallelism (after `apply_tp`), make `model`'s dropout follow the rules above, in place.

    Every `nn.Dropout` given a DTensor drops its local tensor, drawing from the stream where the DTensor is
    replicated and from a sharded region where it is sharded; each mixer's `attend` (its core op, on this rank's
    heads) runs in a sharded region indexed by the tp rank. Models without dropout are left alone (no Python
    wrappers in their compiled blocks). Wrappers replace methods on the instances: names and state dicts stay.
    """
    if model.cfg.dropout == 0:
        return
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.forward = _dropout_on_local_tensor(module.forward, module)
    tp_rank = tp_mesh.get_local_rank()
    for block in model.layers.values():
        mixer = block.mixer
        if hasattr(mixer, "attend"):
            mixer.attend = _in_head_region(mixer.attend, mixer, tp_rank)


def _dropout_on_local_tensor(forward, module: nn.Dropout):
    def forward_on_local_tensor(x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(x, DTensor) and module.training and module.p > 0):
            return forward(x)
        with _region(x):
            local = forward(x.to_local())
        return DTensor.from_local(local, x.device_mesh, x.placements, run_check=False, shape=x.shape,
                                  stride=x.stride())

    return forward_on_local_tensor


def _in_head_region(attend, mixer: nn.Module, tp_rank: int):
    def attend_in_head_region(q: torch.Tensor, *args, **kwargs):
        if not mixer.training:  # nothing is drawn: leave the stream as it is
            return attend(q, *args, **kwargs)
        with sharded_region(tp_rank, q.device):
            return attend(q, *args, **kwargs)

    return attend_in_head_region
