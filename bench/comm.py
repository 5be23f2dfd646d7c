"""Bytes each collective moves in one training step, per layout, next to the analytic volumes.

    python bench/comm.py [--arch transformer | --arch hybrid --mixers gla,rwkv7] [--layouts tp2-sp,dp2-fsdp,...]
                         [--d-model 64 --layers 4 ...]

Each layout runs on gloo CPU processes with the training loop's own step; every collective of one step (after a
warm-up step) is counted on each rank and one JSON object per layout is printed: per collective kind the calls
and the payload (the logical tensor size: an all-gather's gathered output, a reduce-scatter's input, an
all-reduce's tensor, a send's tensor) and the ring-algorithm bytes on the wire, for rank 0 and summed over
ranks; and the analytic payload of the main terms for rank 0 (`analytic`), so what a layout costs can be read
before renting a cluster. Sizes are fp32 here; bf16 activations halve the activation terms.

Analytic terms (s sequence, b micro-batch, h hidden, L blocks, t = tp, m micro-batches per step on the rank,
a = s·b·h·4 bytes, P = parameter bytes on the rank):
  TP + SP   all-gather = reduce-scatter = m·(4L + 2)·a: per block 2 in forward (before the mixer and the MLP)
            and 2 in backward, plus the vocab-parallel embedding and LM head; all-reduce m·3·s·b·4 (the loss) +
            the bytes of the parameters replicated over tp (norms, μ, LoRA down-projections: partial gradients).
  TP        all-reduce = m·(4L + 2)·a: after the mixer and the MLP in forward, before them in backward, plus the
            embedding and LM head; + the loss's (+ RWKV-7's μ and LoRA down-projections: partial gradients).
  FSDP      all-gather = 2m·P, or P with reshard_after_forward off (kept gathered for the whole step);
            reduce-scatter = m·P (every micro-step: gradients stay sharded), or P with
            fsdp_reduce_every_micro_step off (once, after the last micro-step; unsharded until then).
  HSDP      as FSDP over the dp_shard group; all-reduce = P/dp_shard over dp_replicate (once per step).
  DDP       all-reduce = P (last micro-step only).
  PP        send = recv = m·(a/t under SP) per stage boundary crossing, forward and backward, + m·a/t for the
            RWKV-7 carry on the crossings past the first RWKV-7 layer (all of them for a pure RWKV-7).
  CP        (N = cp, T = s/N steps per rank, H heads / t, K×V head dims; per block and micro-batch; `cp_layer_volume`)
            ring attention (transformer, FoX): send = recv = (N−1)·(2 + r) hops of k and v in fp32 (forward, its
            recomputation r, backward; FoX adds c in fp64) + N hops of the dK|dV(|dc) accumulator; FoX all-gathers
            its (2, b, H) fp64 chunk totals; state passing (GLA, RWKV-7): one all-gather of N·2·b·H·K·(V + 1) (GLA)
            or N·2·b·H·K·(V + K) (RWKV-7) fp32 elements; halos (RWKV-7's two token shifts, the Pro KV-shift's k and
            v): one all-gather of N·2·b·width each. Every all-gather's gradient is an all-reduce of its size on gloo
            (a reduce-scatter on NCCL). Per micro-batch the loss all-reduces (sum, count) in fp32. FSDP shards over
            dp × cp. The `cp_group_rank0` entry counts what parallel/context*.py issue apart from the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = {  # name → (processes, parallel section)
    "tp2-sp": (2, {"tp": 2}),
    "tp2": (2, {"tp": 2, "sequence_parallel": False}),
    "dp2-fsdp": (2, {"dp": 2}),
    "dp2-fsdp-keep": (2, {"dp": 2, "reshard_after_forward": False}),
    "dp2-fsdp-once": (2, {"dp": 2, "fsdp_reduce_every_micro_step": False}),
    "dp2-ddp": (2, {"dp": 2, "data_parallel": "ddp"}),
    "pp2-1f1b": (2, {"pp": 2}),
    "pp2-interleaved": (2, {"pp": 2, "pp_schedule": "interleaved_1f1b"}),
    "dp2-tp2-sp": (4, {"dp": 2, "tp": 2}),
    "hsdp-r2s2": (4, {"dp_replicate": 2, "dp_shard": 2}),
    "cp2": (2, {"cp": 2}),
    "cp2-full": (2, {"cp": 2, "recompute": "full"}),
}
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "send", "recv", "broadcast")


def _kind(op_name: str) -> str | None:
    name = op_name.replace("allgather", "all_gather").replace("allreduce", "all_reduce")
    return next((kind for kind in KINDS if kind in name), None)


def _group(args):
    """The op's process group: a functional collective names it, a c10d op passes it boxed; None if neither."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a)
            except RuntimeError:  # a boxed ReduceOp, not a group
                continue
    names = [a for a in args if isinstance(a, str)]
    return _resolve_process_group(names[-1]) if names else None  # the group's name comes last


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _tensors(item)


def _issuer() -> str:
    """The file of the innermost Python frame outside torch and this module: the code that issued a collective."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in name and name != __file__:
            return name
        frame = frame.f_back
    return ""


# where context parallelism issues its collectives (FSDP's over the same ranks come from elsewhere)
CP_FILES = tuple(str(Path(__file__).resolve().parents[1] / "parallel" / f) for f in ("context.py", "context_model.py"))


class CollectiveCounter(TorchDispatchMode):
    """Counts calls, payload bytes and ring wire bytes of every collective dispatched while active; those issued
    from the files `watch` (e.g. CP_FILES) also in `watched` (payload bytes per kind)."""

    def __init__(self, watch: tuple[str, ...] = ()):
        super().__init__()
        self.calls, self.payload, self.wire = Counter(), Counter(), Counter()
        self.watch, self.watched = watch, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _kind(func.name()) if "c10d" in func.namespace else None
        if kind is not None:
            group = _group(args)
            n = group.size() if group is not None else 1
            sizes = [t.numel() * t.element_size() for t in _tensors(args)]
            if kind == "all_gather" and args and isinstance(args[0], (list, tuple)) and args[0] \
                    and isinstance(args[0][0], (list, tuple)):
                payload = sum(sizes[:len(args[0][0])])  # c10d's list form: the gathered output is the n outputs
            elif kind in ("all_gather", "reduce_scatter"):
                # the gathered output or the scattered input: the largest tensor, or the only input × n
                payload = max(sizes) * (n if "functional" in func.namespace and kind == "all_gather" else 1)
            if kind in ("all_gather", "reduce_scatter"):
                wire = payload * (n - 1) / n
            else:
                payload = sizes[0] if kind in ("send", "recv", "broadcast") else sum(sizes)
                wire = payload * (2 * (n - 1) / n if kind == "all_reduce" else 1)
            self.calls[kind] += 1
            self.payload[kind] += payload
            self.wire[kind] += wire
            if self.watch and _issuer() in self.watch:
                self.watched[kind] += payload
        return func(*args, **(kwargs or {}))


def measure(arch: str, parallel: dict, model: dict, train: dict) -> dict:
    """One rank: a warm-up step, then the collectives of one step and the analytic volumes."""
    import torch.distributed as dist

    from parallel.mesh import ParallelDims
    from pretrain.config import build_config
    from pretrain.optim import build_optimizer
    from pretrain.train import build_parallel_model, train_step

    cfg = build_config({"model": {"arch": arch, **model}, "parallel": parallel, "train": train})
    dims = ParallelDims.from_config(cfg, dist.get_world_size())
    mesh = dims.build_mesh("cpu")
    net = build_parallel_model(cfg, mesh, device=torch.device("cpu"), param_dtype=None)
    optimizers = [build_optimizer(part, cfg.optim, torch.device("cpu")) for part in net.parts]
    per_rank = cfg.train.global_batch // dims.dp
    tokens = torch.randint(0, cfg.model.vocab_size, (per_rank, cfg.model.seq_len))
    micro = cfg.train.micro_batch
    batches = [(tokens[i:i + micro], tokens[i:i + micro]) for i in range(0, per_rank, micro)]
    def step():
        train_step(net, optimizers, batches, lr=1e-4, grad_clip=1.0, autocast=torch.autocast("cpu", enabled=False))

    step()  # warm-up: the first step also lays out optimizer state
    with CollectiveCounter(watch=CP_FILES if dims.cp > 1 else ()) as counter:
        step()
    out = {"calls": dict(counter.calls), "payload": dict(counter.payload), "wire": dict(counter.wire),
           "analytic": analytic(cfg, dims, net, micro_batches=len(batches))}
    if dims.cp > 1:
        out["cp"] = {"measured": dict(counter.watched), **cp_analytic(cfg, dims, micro_batches=len(batches))}
    return out


def cp_analytic(cfg, dims, *, micro_batches: int) -> dict:
    """Context parallelism's payload bytes on the cp group per step on this rank (`launch.perfmodel.cp_volume`), and
    per block and micro-batch by mechanism (`cp_layer_volume` of each layer: ring P2P, the rest)."""
    from launch.perfmodel import cp_layer_volume, cp_volume
    from pretrain.config import layer_config

    m, p = cfg.model, cfg.parallel
    common = dict(s=m.seq_len, b=cfg.train.micro_batch, cp=dims.cp, tp=dims.tp, dtype_bytes=4,
                  recompute=p.recompute, reduce_scatter=False)  # gloo reduces with all-reduces; fp32 here
    per_layer = [{part: {kind: nbytes for kind, (_, nbytes) in vol.items()}
                  for part, vol in cp_layer_volume(layer_config(m, i), **common).items()} for i in range(m.n_layers)]
    total = cp_volume(m, micro_batches=micro_batches, **common)
    return {"analytic": {kind: nbytes for kind, (_, nbytes) in total.items()}, "analytic_per_layer": per_layer}


def analytic(cfg, dims, net, *, micro_batches: int) -> dict:
    """The main terms' payload bytes per step on this rank (see the module docstring), from the volume functions
    the performance model (launch/perfmodel.py) uses, so this benchmark checks the model's volumes too."""
    from parallel.pipeline import virtual_stages
    from torch.distributed.tensor import DTensor

    from launch.perfmodel import (boundaries, carry_boundaries, dp_volume, hsdp_replicate_volume, pp_volume,
                                  tp_volume)
    m, p = micro_batches, cfg.parallel
    # TP's and PP's activations are a cp rank's own s / cp steps
    s, b, h, L = cfg.model.seq_len // dims.cp, cfg.train.micro_batch, cfg.model.d_model, cfg.model.n_layers
    out = Counter()

    def add(volume):
        out.update({kind: payload for kind, (_, payload) in volume.items()})
    if dims.tp > 1:
        add(tp_volume(s=s, b=b, h=h, layers=L, ends=2, micro_batches=m, dtype_bytes=4,
                      sequence_parallel=p.sequence_parallel))
        if p.sequence_parallel:
            # parameters replicated over tp (norms, μ, LoRA down-projections) get partial gradients: summed once
            out["all_reduce"] += sum(q.numel() * 4 for part in net.parts for q in part.parameters()
                                     if q.placements[-1].is_replicate())
    if dims.dp * dims.cp > 1:  # FSDP shards (DDP reduces) over dp × cp
        fsdp = p.data_parallel == "fsdp"

        def tp_local_count(module):  # this rank's tensor-parallel share of the parameters, FSDP shards undone
            return sum((q.to_local() if isinstance(q, DTensor) else q).numel() for q in module.parameters()) \
                * (dims.dp_shard * dims.cp if fsdp else 1)
        params = sum(tp_local_count(part) for part in net.parts)
        # a pipeline schedule accumulates a stage's micro-batches unsharded and reduces once, whatever the option
        add(dp_volume(params, units=1, micro_batches=m, fsdp=fsdp, reshard_after_forward=p.reshard_after_forward,
                      reduce_every_micro_step=p.fsdp_reduce_every_micro_step and dims.pp == 1, gather_bytes=4,
                      reduce_bytes=4))
        if dims.dp_replicate > 1:
            add(hsdp_replicate_volume(params, units=1, dp_shard=dims.dp_shard, reduce_bytes=4))
    if dims.cp > 1:
        add({kind: (0, nbytes) for kind, nbytes in cp_analytic(cfg, dims, micro_batches=m)["analytic"].items()})
    if dims.pp > 1:
        v = virtual_stages(p)
        add(pp_volume(s=s, b=b, h=h, tp=dims.tp, micro_batches=m, boundaries=boundaries(0, dims.pp, v), dtype_bytes=4,
                      sequence_parallel=p.sequence_parallel,
                      carry_boundaries=carry_boundaries(cfg.model, 0, dims.pp, v, p.pp_layers)))
    return dict(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="transformer", help="transformer | fox | gla | rwkv7 | hybrid")
    parser.add_argument("--mixers", default="", help="with --arch hybrid: each layer's mixer, e.g. 'gla,rwkv7'")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, from: {', '.join(LAYOUTS)}")
    parser.add_argument("--d-model", type=int, default=64, help="hidden size h")
    parser.add_argument("--layers", type=int, default=4, help="blocks L")
    parser.add_argument("--heads", type=int, default=4, help="heads (divisible by tp)")
    parser.add_argument("--seq-len", type=int, default=32, help="sequence length s")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size (divisible by tp)")
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-step b")
    args = parser.parse_args(argv)
    from tests.dist import run_distributed
    model = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads, "seq_len": args.seq_len,
             "vocab_size": args.vocab, **({"mixers": args.mixers} if args.mixers else {})}
    train = {"global_batch": args.global_batch, "micro_batch": args.micro_batch}
    for name in args.layouts.split(","):
        world, parallel = LAYOUTS[name]
        ranks = run_distributed(measure, world, args.arch, parallel, model, train)
        all_ranks = {key: dict(sum((Counter(r[key]) for r in ranks), Counter())) for key in ("payload", "wire")}
        row = {"layout": name, "processes": world, "arch": args.arch, "model": model, "train": train,
               "rank0": {k: ranks[0][k] for k in ("calls", "payload", "wire")},
               "all_ranks": all_ranks, "analytic": ranks[0]["analytic"]}
        if "cp" in ranks[0]:
            row["cp_group_rank0"] = ranks[0]["cp"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
