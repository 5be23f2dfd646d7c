"""Time and communication of the context-parallel kernels: cp=1 vs cp=2 on CPU, per mixer.

    python bench/context.py [--seq 2048 --batch 1 --heads 4 --head-dim 32 --reps 3 --documents 0]

For each mixer (softmax and FoX ring attention, GLA and RWKV-7 state passing) one forward + backward of the
kernel on a (B, T, H, D) sequence, fp32: the single-process op on the whole sequence, the CP kernel on one
process (cp=1) and on two gloo processes (cp=2, each holding T/2 steps; one thread per process, as torchrun
sets). Prints one JSON object: per mixer the median seconds (slowest rank), and the elements each rank sends
per layer, counted at the collectives' call sites (a send's tensor; an all-gather's input; an all-reduce's
tensor), next to the analytic volumes of `parallel/context.py`'s docstring. --documents n packs n equal
documents per row (ring attention then skips the key chunks no query chunk can see).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.context import ContextShard, gla_context, ring_attention, rwkv7_context  # noqa: E402
from pretrain.ops import DocumentMask, causal_attention, forgetting_attention, gla, rwkv7  # noqa: E402
from tests.dist import run_distributed  # noqa: E402

MIXERS = ("softmax", "fox", "gla", "rwkv7")


def _inputs(name: str, B: int, T: int, H: int, D: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if name == "softmax":
        return [randn(B, T, H, D) for _ in range(3)]
    if name == "fox":
        return [randn(B, T, H, D) for _ in range(3)] + [F.logsigmoid(randn(B, T, H) + 3)]
    if name == "gla":  # key dim half the value dim, as in the GLA layer
        K = D // 2
        return [randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, D), F.logsigmoid(randn(B, T, H, K)) / 16]
    kappa = F.normalize(randn(B, T, H, D), dim=-1)
    w = -0.6 * torch.sigmoid(randn(B, T, H, D))
    return [randn(B, T, H, D), w, randn(B, T, H, D), randn(B, T, H, D), -kappa,
            kappa * torch.sigmoid(randn(B, T, H, D))]


def _whole(name, xs, docs):
    if name == "softmax":
        return causal_attention(*xs, docs=docs)
    if name == "fox":
        return forgetting_attention(*xs, impl="torch", docs=docs)
    if name == "gla":
        return gla(*xs, impl="torch", docs=docs)
    return rwkv7(*xs, impl="torch", docs=docs)


def _context(name, xs, docs, shard):
    if name == "softmax":
        return ring_attention(*xs, shard=shard, docs=docs)
    if name == "fox":
        return ring_attention(*xs[:3], log_f=xs[3], shard=shard, docs=docs)
    if name == "gla":
        return gla_context(*xs, shard=shard, docs=docs, impl="torch")
    return rwkv7_context(*xs, shard=shard, docs=docs, impl="torch")


class _CountSends:
    """Elements this rank hands to collectives while active (P2P sends, all-gather inputs, all-reduces)."""

    def __init__(self):
        self.counts = Counter()

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in ("batch_isend_irecv", "all_gather", "all_reduce",
                                                             "all_gather_into_tensor", "reduce_scatter_tensor")}

        def batch(ops):
            self.counts["send"] += sum(op.tensor.numel() for op in ops if op.op is dist.isend)
            return self.saved["batch_isend_irecv"](ops)

        def counted(name, arg):
            def call(*args, **kwargs):
                self.counts[name] += args[arg].numel()
                return self.saved[name](*args, **kwargs)
            return call

        dist.batch_isend_irecv = batch
        dist.all_gather = counted("all_gather", 1)
        dist.all_gather_into_tensor = counted("all_gather", 1)
        dist.all_reduce = counted("all_reduce", 0)
        dist.reduce_scatter_tensor = counted("reduce_scatter", 1)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _starts(B: int, T: int, documents: int) -> torch.Tensor:
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, ::T // documents] = True
    return starts


def _measure(cfg: dict) -> dict:
    B, T, H, D, reps = cfg["batch"], cfg["seq"], cfg["heads"], cfg["head_dim"], cfg["reps"]
    shard = ContextShard.from_group(dist.group.WORLD)
    full_starts = _starts(B, T, cfg["documents"]) if cfg["documents"] else None
    results = {}
    for name in MIXERS:
        full = _inputs(name, B, T, H, D)
        local = [shard.split(x) for x in full]
        docs = None if full_starts is None else DocumentMask(shard.split(full_starts))

        def step(make_docs=lambda: docs):
            xs = [x.clone().requires_grad_() for x in local]
            out = _context(name, xs, make_docs(), shard)
            out.sum().backward()

        # a fresh mask per step, as training builds one per forward (the plan's all-gather is then counted)
        fresh = (lambda: None) if docs is None else (lambda: DocumentMask(shard.split(full_starts)))
        step(fresh)  # warm-up
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            step(fresh)
            times.append(time.perf_counter() - t0)
        with _CountSends() as counter:
            step(fresh)
        results[name] = {"seconds": statistics.median(times), "sent_elements": dict(counter.counts)}
        if shard.size == 1:
            whole_docs = None if full_starts is None else DocumentMask(full_starts)
            times = []
            for _ in range(reps + 1):
                xs = [x.clone().requires_grad_() for x in full]
                t0 = time.perf_counter()
                _whole(name, xs, whole_docs).sum().backward()
                times.append(time.perf_counter() - t0)
            results[name]["whole_op_seconds"] = statistics.median(times[1:])
    return results


def analytic(name: str, *, B: int, T: int, H: int, D: int, N: int, documents: bool) -> dict:
    """Elements one rank sends per layer (forward + backward) by the docstring's formulas."""
    T_loc = T // N
    if name in ("softmax", "fox"):
        kv = 2 * B * T_loc * H * D  # k and v of one rank's block
        c = B * T_loc * H if name == "fox" else 0  # c travels with the block, dc with the gradients
        ids = B * T_loc if documents else 0  # global document ids travel with the block
        return {"send_forward": (N - 1) * (kv + c + ids), "send_backward": (N - 1) * (kv + c + ids) + N * (kv + c)}
    K = D // 2 if name == "gla" else D
    per_rank = 2 * B * H * K * (D + (1 if name == "gla" else K))
    return {"all_gather_forward": per_rank, "all_reduce_backward": N * per_rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--documents", type=int, default=0, help="equal documents per row (0: no masking)")
    args = parser.parse_args()
    cfg = vars(args)
    torch.set_num_threads(1)
    one = run_distributed(_measure, 1, cfg, timeout=3600)[0]
    two = run_distributed(_measure, 2, cfg, timeout=3600)
    report = {"machine": "CPU, gloo, 1 thread per process", "config": cfg, "mixers": {}}
    for name in MIXERS:
        slowest = max(r[name]["seconds"] for r in two)
        report["mixers"][name] = {
            "whole_op_seconds": one[name]["whole_op_seconds"],
            "cp1_seconds": one[name]["seconds"],
            "cp2_seconds": slowest,
            "cp2_speedup_over_whole_op": one[name]["whole_op_seconds"] / slowest,
            "cp2_sent_elements_rank0": two[0][name]["sent_elements"],
            "cp2_analytic_elements": analytic(name, B=args.batch, T=args.seq, H=args.heads, D=args.head_dim, N=2,
                                              documents=bool(args.documents)),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
