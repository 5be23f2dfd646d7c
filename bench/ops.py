"""Benchmark the sequence-mixer ops on CPU: forward+backward time of our chunkwise / blockwise torch paths
against fla-core's naive references (measured side by side in one run), the cost of document masking (the
same op with and without `docs`, side by side), and the memory they keep for backward as T grows. Prints
one JSON object to stdout.

    python -m bench.ops [--T 512 2048] [--repeats 3] [--docs-per-row 4] [--mem-T 512 1024 2048 4096]

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

from pretrain.ops import DocumentMask, causal_attention, forgetting_attention, gla, rwkv7


def make_inputs(op: str, B: int, T: int, H: int, D: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    if op == "attention":
        xs = [q, k, v]
    elif op == "gla":
        xs = [q, k, v, F.logsigmoid(randn(B, T, H, D)) / 16]  # GLA's gate: logsigmoid(·)/16
    elif op == "fox":
        xs = [q, k, v, F.logsigmoid(randn(B, T, H) + 2)]
    else:  # rwkv7: w = −e^{−½}σ(·), a = −κ̂, b = κ̂ ⊙ α
        kappa = F.normalize(randn(B, T, H, D), dim=-1)
        w = -0.6065 * torch.sigmoid(randn(B, T, H, D))
        xs = [q, w, k, v, -kappa, kappa * torch.rand(B, T, H, D, generator=gen)]
    return [x.requires_grad_() for x in xs]


def ours(op: str, docs: DocumentMask | None = None):
    return {"attention": lambda q, k, v: causal_attention(q, k, v, docs=docs),
            "gla": lambda q, k, v, g: gla(q, k, v, g, impl="torch", docs=docs),
            "fox": lambda q, k, v, f: forgetting_attention(q, k, v, f, impl="torch", docs=docs),
            "rwkv7": lambda r, w, k, v, a, b: rwkv7(r, w, k, v, a, b, impl="torch", docs=docs)}[op]


def document_mask(B: int, T: int, docs_per_row: int, seed: int = 0) -> DocumentMask:
    """docs_per_row documents in every row, at random boundaries (a row's first one continues from before it)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.zeros(B, T, dtype=torch.bool)
    for row in starts:
        row[1 + torch.randperm(T - 1, generator=gen)[:docs_per_row - 1]] = True
    return DocumentMask(starts)


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
    parser.add_argument("--doc-ops", nargs="+", default=["attention", "gla", "fox", "rwkv7"],
                        choices=["attention", "gla", "fox", "rwkv7"], help="ops timed with and without docs")
    parser.add_argument("--docs-per-row", type=int, default=4, help="documents per row in the masked timings")
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
    if not 1 <= args.docs_per_row <= min(args.T):
        parser.error(f"--docs-per-row must be between 1 and the shortest --T ({min(args.T)}); got {args.docs_per_row}")
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
    masking = {}
    for op in args.doc_ops:
        masking[op] = {}
        for T in args.T:
            inputs = make_inputs(op, args.B, T, args.H, args.D)
            # built once and shared by every call, as the layers of one forward share one mask's cached forms
            docs = document_mask(args.B, T, args.docs_per_row)
            t_plain, t_masked = fwd_bwd_seconds((ours(op), ours(op, docs)), inputs, args.repeats, clock)
            masking[op][T] = {"unmasked_s": round(t_plain, 4), "masked_s": round(t_masked, 4),
                              "masked_vs_unmasked": round(t_masked / t_plain, 2),
                              "unmasked_saved_MiB": mib(ours(op), inputs),
                              "masked_saved_MiB": mib(ours(op, docs), inputs)}
    print(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "config": {"B": args.B, "H": args.H, "D": args.D, "dtype": "float32", "device": "cpu",
                   "repeats": args.repeats,
                   "timing": f"{args.clock}-clock median of fwd+bwd, ours and fla's naive taking turns, "
                             "a warm-up round dropped",
                   "memory": "bytes of distinct buffers autograd saves in one forward (saved_tensors_hooks)",
                   "document_masking": f"{args.docs_per_row} documents per row at random boundaries, the same op "
                                       "with and without docs taking turns; attention is SDPA (the mask's cached "
                                       "additive form with docs, is_causal without)"},
        "fwd_bwd_vs_fla_naive": vs_naive,
        "document_masking_fwd_bwd": masking,
        "saved_memory_vs_T": memory,
    }, indent=2))


if __name__ == "__main__":
    main()
