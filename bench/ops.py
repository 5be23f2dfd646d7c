"""Benchmark the sequence-mixer ops on CPU: forward+backward time of our chunkwise / blockwise torch paths
against fla-core's naive references (measured side by side in one run), and the memory they keep for
backward as T grows. Prints one JSON object to stdout.

    python -m bench.ops [--T 512 2048] [--repeats 3] [--mem-T 512 1024 2048 4096]

Memory is the total size of the distinct buffers autograd saves for backward during one forward
(`torch.autograd.graph.saved_tensors_hooks`), i.e. activation memory, not process RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from pretrain.ops.forgetting import forgetting_attention
from pretrain.ops.gla import gla
from pretrain.ops.rwkv7 import rwkv7


def make_inputs(op: str, B: int, T: int, H: int, D: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    if op == "gla":
        xs = [q, k, v, F.logsigmoid(randn(B, T, H, D)) / 16]  # GLA's gate: logsigmoid(·)/16
    elif op == "fox":
        xs = [q, k, v, F.logsigmoid(randn(B, T, H) + 2)]
    else:  # rwkv7: w = −e^{−½}σ(·), a = −κ̂, b = κ̂ ⊙ α
        kappa = F.normalize(randn(B, T, H, D), dim=-1)
        w = -0.6065 * torch.sigmoid(randn(B, T, H, D))
        xs = [q, w, k, v, -kappa, kappa * torch.rand(B, T, H, D, generator=gen)]
    return [x.requires_grad_() for x in xs]


def ours(op: str):
    return {"gla": lambda q, k, v, g: gla(q, k, v, g, impl="torch"),
            "fox": lambda q, k, v, f: forgetting_attention(q, k, v, f, impl="torch"),
            "rwkv7": lambda r, w, k, v, a, b: rwkv7(r, w, k, v, a, b, impl="torch")}[op]


def reference(op: str):
    from fla.ops.forgetting_attn.naive import naive_forgetting_attn
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
    from fla.ops.gla.naive import naive_recurrent_gla

    def dplr(r, w, k, v, a, b):
        hf = lambda x: x.transpose(1, 2)  # noqa: E731  fla's head-first layout
        return hf(dplr_recurrence(hf(r) * r.shape[-1] ** 0.5, hf(k), hf(v), hf(a), hf(b), hf(w))[0])

    return {"gla": lambda q, k, v, g: naive_recurrent_gla(q, k, v, g)[0],
            "fox": naive_forgetting_attn, "rwkv7": dplr}[op]


def fwd_bwd_seconds(fns, inputs, repeats: int, clock) -> list[float]:
    """Median fwd+bwd time of each fn; the fns take turns in every round so that drifting load hits all alike."""
    times = [[] for _ in fns]
    for round_ in range(repeats + 1):  # round 0 warms up allocators and caches and is dropped
        for fn, ts in zip(fns, times):
            for x in inputs:
                x.grad = None
            start = clock()
            fn(*inputs).sum().backward()
            if round_:
                ts.append(clock() - start)
    return [statistics.median(ts) for ts in times]


def saved_bytes(fn, inputs) -> int:
    storages = {}  # a tensor saved by several ops, or several views of one buffer, count once

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=["gla", "fox", "rwkv7"], choices=["gla", "fox", "rwkv7"])
    parser.add_argument("--T", nargs="+", type=int, default=[512, 2048], help="sequence lengths to time")
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--D", type=int, default=64, help="head dim (K = V)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (median reported)")
    parser.add_argument("--mem-T", nargs="+", type=int, default=[512, 1024, 2048, 4096],
                        help="sequence lengths for the saved-for-backward memory sweep")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: CPU seconds of this process (all its threads), steadier "
                             "on a machine shared with other jobs")
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Triton is not supported")

    mib = lambda fn, inputs: round(saved_bytes(fn, inputs) / 2 ** 20, 2)  # noqa: E731
    vs_naive, memory = {}, {}
    for op in args.ops:
        vs_naive[op] = {}
        for T in args.T:
            inputs = make_inputs(op, args.B, T, args.H, args.D)
            t_ours, t_ref = fwd_bwd_seconds((ours(op), reference(op)), inputs, args.repeats, clock)
            vs_naive[op][T] = {"ours_s": round(t_ours, 4), "fla_naive_s": round(t_ref, 4),
                               "speedup": round(t_ref / t_ours, 2), "ours_saved_MiB": mib(ours(op), inputs),
                               "fla_naive_saved_MiB": mib(reference(op), inputs)}
        # linear memory shows as saved bytes per token staying flat (ratio 1.0 to the shortest T)
        memory[op] = {T: mib(ours(op), make_inputs(op, args.B, T, args.H, args.D)) for T in args.mem_T}
        base = args.mem_T[0]
        memory[op] = {T: {"ours_saved_MiB": m, f"per_token_vs_T{base}": round(m / memory[op][base] * base / T, 3)}
                      for T, m in memory[op].items()}
    print(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "config": {"B": args.B, "H": args.H, "D": args.D, "dtype": "float32", "device": "cpu",
                   "repeats": args.repeats,
                   "timing": f"{args.clock}-clock median of fwd+bwd, ours and fla's naive taking turns, "
                             "a warm-up round dropped",
                   "memory": "bytes of distinct buffers autograd saves in one forward (saved_tensors_hooks)"},
        "fwd_bwd_vs_fla_naive": vs_naive,
        "saved_memory_vs_T": memory,
    }, indent=2))


if __name__ == "__main__":
    main()
