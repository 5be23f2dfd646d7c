"""Activation memory: the `gpt` preset against Korthikanti et al., and all four architectures with and without MsT.

    python -m bench.memory [--seq 512] [--batch 1] [--d-model 256] [--heads 8] [--archs] [--max-seq 32768]

Saved-activation bytes are the distinct storages autograd keeps for backward during one forward
(`torch.autograd.graph.saved_tensors_hooks`), parameters excluded; per layer = (L layers) − (L − 1 layers).
Prints one JSON object, then a table of measured vs formula bytes per layer for recompute none / selective / full.
With --archs it also measures, for transformer / FoX / GLA / RWKV-7 at tiny width, saved bytes per token per
layer for each recompute mode × MsT off/on, and the peak live memory of one forward + backward (`PeakMemory`)
against sequence length; it prints both as tables and writes them to <out>/memory-cpu-<N>core.json and a plot to
<out>/memory-vs-seqlen-cpu.png (needs matplotlib, the `bench` extra). CPU only: `PeakMemory` counts CPU storages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from parallel.minisequence import apply_minisequence
from parallel.recompute import apply_recompute
from pretrain.config import build_config
from pretrain.models import build_model


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages saved for backward by one forward of model(tokens, labels)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params and t.device.type != "meta":
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels=labels)
    return sum(storages.values())


def gpt_config(*, seq: int, d_model: int, heads: int, layers: int, vocab: int = 128):
    return build_config({"model": {"preset": "gpt", "d_model": d_model, "n_heads": heads, "n_layers": layers,
                                   "seq_len": seq, "vocab_size": vocab}})


def per_layer_bytes(mode: str, *, seq: int, batch: int, d_model: int, heads: int, layers: int = 2,
                    dtype: torch.dtype = torch.bfloat16) -> int:
    """Saved bytes of `layers` minus `layers - 1` blocks of the gpt preset under recompute `mode`."""
    sizes = []
    for n in (layers - 1, layers):
        cfg = gpt_config(seq=seq, d_model=d_model, heads=heads, layers=n)
        torch.manual_seed(0)
        model = build_model(cfg.model).to(dtype)
        apply_recompute(model, mode)
        model.train()
        tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq))
        sizes.append(saved_bytes(model, tokens, tokens))
    return sizes[1] - sizes[0]


def formula_bytes(mode: str, *, s: int, b: int, h: int, a: int) -> float:
    """Korthikanti et al. 2022 (t = 1): none sbh(34 + 5as/h), selective 34·sbh, full 2sbh (DESIGN §5)."""
    return s * b * h * {"none": 34 + 5 * a * s / h, "selective": 34, "full": 2}[mode]


def cpu_extra_bytes(mode: str, *, s: int, b: int, h: int, a: int) -> dict[str, float]:
    """The terms by which this CPU build differs from the paper, each explained (bf16, unfused attention):
    the paper stores dropout masks as 1 byte each, eager CPU dropout keeps them in the input's dtype (2 bytes);
    the unfused path materialises its causal mask (s² bools, per layer, not per sample); LayerNorm keeps its
    mean and rstd (2 norms × 2 × sb, in bf16) which the paper neglects. Full recomputation keeps only block inputs."""
    if mode == "full":
        return {}
    extra = {"residual dropout masks at 2 bytes": 2 * s * b * h, "layernorm mean and rstd": 8 * s * b}
    if mode == "none":
        extra |= {"attention dropout mask at 2 bytes": a * s * s * b, "causal mask (s² bools)": s * s}
    return extra


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created while active (forward and backward on CPU): each op's outputs
    count until their storage is freed. `peak` excludes what existed before entering."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                key = s.data_ptr()
                if key in self._seen or s.nbytes() == 0:
                    continue  # a view of, or an op in place on, a storage already counted
                self._seen.add(key)
                self.live += s.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(s, self._free, key, s.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


ARCHS = ("transformer", "fox", "gla", "rwkv7")
MODES = ("none", "selective", "full")


def arch_model(arch: str, *, seq: int, layers: int, mode: str, mst: int, dtype: torch.dtype,
               d_model: int = 64, heads: int = 4, vocab: int = 4096) -> torch.nn.Module:
    """A tiny `arch` model (default kernels, no dropout) under recompute `mode` and `mst` mini-sequence chunks."""
    cfg = build_config({"model": {"arch": arch, "d_model": d_model, "n_heads": heads, "n_layers": layers,
                                  "seq_len": seq, "vocab_size": vocab}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    model.to(dtype)
    apply_recompute(model, mode)
    apply_minisequence(model, mst)
    return model.train()


def arch_bytes_per_token(arch: str, mode: str, *, mst: int, seq: int, dtype: torch.dtype) -> float:
    """Saved bytes per token of one layer: (2 layers − 1 layer) / seq, batch 1."""
    sizes = []
    for layers in (1, 2):
        model = arch_model(arch, seq=seq, layers=layers, mode=mode, mst=mst, dtype=dtype)
        tokens = torch.randint(0, model.cfg.vocab_size, (1, seq))
        sizes.append(saved_bytes(model, tokens, tokens))
    return (sizes[1] - sizes[0]) / seq


def peak_fwd_bwd(arch: str, mode: str, *, mst: int, seq: int, dtype: torch.dtype, layers: int = 2) -> int:
    """Peak bytes of live tensors (beyond the parameters) over one forward + backward, batch 1."""
    model = arch_model(arch, seq=seq, layers=layers, mode=mode, mst=mst, dtype=dtype)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, seq))
    with PeakMemory() as mem:
        model(tokens, labels=tokens).backward()
    return mem.peak


def sweep_plan(max_seq: int) -> list[tuple[str, str, int, list[int]]]:
    """(arch, recompute, MsT chunks, sequence lengths) to measure peaks for, sized to take minutes on 2 CPU cores.
    Plain (none, MsT off) stops at 8K, where its (T, V) logits and their gradient already dominate; full
    recomputation + MsT (8 chunks) goes on to `max_seq` for GLA and RWKV-7 (linear in T), to 16K for the
    transformer (SDPA's T² compute) and to 2K for FoX, whose blockwise CPU kernel is slow at long T (4K took ~50 s)."""
    lengths = [n for n in (1024, 2048, 4096, 8192, 16384, 32768) if n <= max_seq]
    caps = {"transformer": 16384, "fox": 2048}
    plan = []
    for arch in ARCHS:
        cap = min(caps.get(arch, max_seq), max_seq)
        plan.append((arch, "none", 1, [n for n in lengths if n <= min(cap, 8192)]))
        plan.append((arch, "full", 8, [n for n in lengths if n <= cap]))
    return plan


def plot_peaks(peaks: list[dict], path: str) -> None:
    """Peak memory against sequence length, one line per (arch, recompute, MsT), log-log."""
    import matplotlib  # the `bench` extra; imported here so the rest of the module does not need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for arch, color in zip(ARCHS, ("C0", "C1", "C2", "C3")):
        for row in (r for r in peaks if r["arch"] == arch):
            seqs = sorted(int(n) for n in row["peak_bytes"])
            ax.plot(seqs, [row["peak_bytes"][str(n)] / 2**20 for n in seqs], color=color, marker="o",
                    linestyle="-" if row["mst"] > 1 else "--",
                    label=f"{arch} {row['recompute']}, MsT {'x' + str(row['mst']) if row['mst'] > 1 else 'off'}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens, batch 1)", ylabel="peak live MiB",
           title="Peak memory, one forward + backward (2 layers, d=64, V=4096, fp32, CPU)")
    ax.set_xticks([1024, 2048, 4096, 8192, 16384, 32768], ["1K", "2K", "4K", "8K", "16K", "32K"])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_archs(*, seq: int, max_seq: int, out: str) -> dict:
    """Per-layer bytes per token (bf16) and the peak sweep (fp32) for the four architectures; writes JSON + PNG."""
    per_layer = {arch: {mode: {f"mst{m}": arch_bytes_per_token(arch, mode, mst=m, seq=seq, dtype=torch.bfloat16)
                               for m in (1, 4)} for mode in MODES} for arch in ARCHS}
    print(f"\nsaved bytes per token per layer (bf16, d=64, 4 heads, T={seq}, MsT = 4 chunks)")
    print(f"{'arch':<12}" + "".join(f"{mode + (' +MsT' if m == 4 else ''):>16}" for mode in MODES for m in (1, 4)))
    for arch, modes in per_layer.items():
        print(f"{arch:<12}" + "".join(f"{modes[mode][f'mst{m}']:>16.0f}" for mode in MODES for m in (1, 4)))
    peaks = []
    for arch, mode, mst, lengths in sweep_plan(max_seq):
        row = {"arch": arch, "recompute": mode, "mst": mst, "peak_bytes": {}, "seconds": {}}
        for n in lengths:
            start = time.perf_counter()
            row["peak_bytes"][str(n)] = peak_fwd_bwd(arch, mode, mst=mst, seq=n, dtype=torch.float32)
            row["seconds"][str(n)] = round(time.perf_counter() - start, 2)
        peaks.append(row)
    lengths = sorted({int(n) for r in peaks for n in r["peak_bytes"]})
    print("\npeak live MiB of one forward + backward (fp32, 2 layers, d=64, V=4096, batch 1; - = not run)")
    print(f"{'arch':<12} {'recompute':<10} {'MsT':>4}" + "".join(f"{n:>9}" for n in lengths))
    for r in peaks:
        cells = [f"{r['peak_bytes'][str(n)] / 2**20:>9.1f}" if str(n) in r["peak_bytes"] else f"{'-':>9}"
                 for n in lengths]
        print(f"{r['arch']:<12} {r['recompute']:<10} {r['mst']:>4}" + "".join(cells))
    device = f"cpu-{os.cpu_count()}core"
    result = {
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "command": f"python -m bench.memory --archs --arch-seq {seq} --max-seq {max_seq}",
        "note": "tiny width: d=64, 4 heads, vocab 4096, default kernels, batch 1. per_layer_bytes_per_token: bf16, "
                "saved-for-backward bytes of 2 layers minus 1 layer over T tokens, recompute mode x MsT "
                "(1 = off, 4 chunks). peaks: fp32 live-tensor peak (PeakMemory) of one forward + backward of a "
                "2-layer model, parameters excluded, gradients included; plain (none, MsT off) up to 8K; full "
                "recompute + MsT x8 up to max_seq for GLA and RWKV-7, 16K for the transformer, 2K for FoX "
                "(its blockwise CPU kernel is slow at long T: 4K took ~50 s). seconds: wall time per point.",
        "per_layer_bytes_per_token": per_layer,
        "peaks": peaks,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"memory-{device}.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_peaks(peaks, os.path.join(out, "memory-vs-seqlen-cpu.png"))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--archs", action="store_true", help="also the four architectures with and without MsT")
    ap.add_argument("--arch-seq", type=int, default=1024, help="sequence length of the per-layer bytes")
    ap.add_argument("--max-seq", type=int, default=32768, help="longest sequence of the peak sweep")
    ap.add_argument("--out", default="bench/results", help="where --archs writes its JSON and plot")
    args = ap.parse_args(argv)
    s, b, h, a = args.seq, args.batch, args.d_model, args.heads
    rows = {}
    for mode in ("none", "selective", "full"):
        measured = per_layer_bytes(mode, seq=s, batch=b, d_model=h, heads=a)
        formula = formula_bytes(mode, s=s, b=b, h=h, a=a)
        extra = cpu_extra_bytes(mode, s=s, b=b, h=h, a=a)
        rows[mode] = {"measured_bytes": measured, "formula_bytes": formula, "measured_over_sbh": measured / (s * b * h),
                      "formula_over_sbh": formula / (s * b * h), "explained_extra_bytes": extra,
                      "unexplained_bytes": measured - formula - sum(extra.values())}
    print(json.dumps({"s": s, "b": b, "h": h, "a": a, "dtype": "bf16", "per_layer": rows}))
    print(f"{'recompute':<10} {'measured':>12} {'formula':>12} {'meas/sbh':>9} {'form/sbh':>9} {'unexplained':>12}")
    for mode, r in rows.items():
        print(f"{mode:<10} {r['measured_bytes']:>12} {r['formula_bytes']:>12.0f} {r['measured_over_sbh']:>9.2f} "
              f"{r['formula_over_sbh']:>9.2f} {r['unexplained_bytes']:>12.0f}")
        for term, nbytes in r["explained_extra_bytes"].items():
            print(f"{'':<10} + {term}: {nbytes}")
    if args.archs:
        run_archs(seq=args.arch_seq, max_seq=args.max_seq, out=args.out)


if __name__ == "__main__":
    main()
