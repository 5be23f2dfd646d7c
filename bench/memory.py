"""Activation memory: the `gpt` preset against Korthikanti et al., and all four architectures with and without MsT.

    python -m bench.memory [--seq 512] [--batch 1] [--d-model 256] [--heads 8] [--tp 2] [--archs] [--max-seq 32768]

Saved-activation bytes are the distinct storages autograd keeps for backward during one forward
(`torch.autograd.graph.saved_tensors_hooks`), parameters excluded; under tensor parallelism a saved DTensor counts
as its local shard, so the bytes are one rank's; per layer = (L layers) − (L − 1 layers).
Prints one JSON object, then a table of measured vs formula bytes per layer for the rows of the paper's table 2:
recompute none / selective / full on one process, and TP, TP+SP, TP+selective, TP+SP+selective on `--tp` gloo
processes with the training run's own tensor-parallel plan (`parallel.parallelize`; SP rows with
`parallel.sp_regather` on, and again without it: "…, gathered kept"); writes the same to
<out>/memory-gpt-cpu.json. Each row lists the terms by which this build differs from the paper, with the reason
(`cpu_extra_bytes`); what is left (`unexplained`) must stay within 3% of the formula.
With --archs it also measures, for transformer / FoX / GLA / RWKV-7 at tiny width, saved bytes per token per
layer for each recompute mode × MsT off/on, and the peak live memory of one forward + backward (`PeakMemory`)
against sequence length; it prints both as tables and writes them to <out>/memory-cpu-<N>core.json and a plot to
<out>/memory-vs-seqlen-cpu.png (needs matplotlib, the `bench` extra). CPU only: `PeakMemory` counts CPU storages.

    python -m bench.memory --cp 2 [--cp-seq 1024]

Context parallelism instead (only this): for transformer / FoX / GLA / RWKV-7 at tiny width, the saved-activation
bytes per layer on one rank with parallel.cp = N (N gloo processes, the model side of the training run's
`parallelize`: `parallel.context_model.apply_cp`, on the rank's zigzag part of each sequence) against one process
with the whole sequence, split by where they were saved: the mixer, the MLP, the rest of the block (norms,
residual) and the ends (embedding, head, loss); writes
<out>/memory-cp<N>-cpu.json. The mixer and the MLP should hold ≈ 1/N of the cp = 1 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
import weakref
from functools import partial

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from parallel.mesh import ParallelDims
from parallel.minisequence import apply_minisequence
from parallel.parallelize import parallelize
from parallel.recompute import apply_recompute
from pretrain.config import build_config
from pretrain.models import build_model


def _stored(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `t`'s data on this process: for a tensor subclass (a DTensor's local shard, the
    result of a collective still in flight) its inner tensors, recursively, else `t`."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, name) for name in names)
        return [x for i in inner if isinstance(i, torch.Tensor) for x in _stored(i)]  # a DTensor also names its mesh
    return [t]


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages this process saves for backward in one forward of
    model(tokens, labels) and still holds at its end: one saved during the forward and freed before its end (a
    branch whose graph was dropped) does not count, nor does a later storage at its address count twice."""
    params = {x.untyped_storage().data_ptr() for p in model.parameters() for x in _stored(p)}
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor):
        for x in _stored(t):
            s = x.untyped_storage()
            if s.data_ptr() not in params and x.device.type != "meta":
                saved.append(weakref.ref(s))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, labels=labels)  # holds the graph, and so what it saved, while the storages are summed
    alive = {s.data_ptr(): s.nbytes() for s in (ref() for ref in saved) if s is not None}
    del out
    return sum(alive.values())


def gpt_config(*, seq: int, d_model: int, heads: int, layers: int, vocab: int = 128, parallel: dict | None = None):
    return build_config({"model": {"preset": "gpt", "d_model": d_model, "n_heads": heads, "n_layers": layers,
                                   "seq_len": seq, "vocab_size": vocab}, "parallel": parallel or {}})


def per_layer_bytes(mode: str, *, seq: int, batch: int, d_model: int, heads: int, layers: int = 2,
                    dtype: torch.dtype = torch.bfloat16, sequence_parallel: bool = False,
                    sp_regather: bool = True) -> int:
    """Saved bytes of `layers` minus `layers - 1` blocks of the gpt preset under recompute `mode`.

    On one process, or inside an initialised process group: then the model is tensor-parallel over all its
    ranks (`parallelize`, the training run's plan) and the bytes are this rank's."""
    tp = dist.get_world_size() if dist.is_initialized() else 1
    sizes = []
    for n in (layers - 1, layers):
        cfg = gpt_config(seq=seq, d_model=d_model, heads=heads, layers=n,
                         parallel={"tp": tp, "sequence_parallel": sequence_parallel, "sp_regather": sp_regather,
                                   "recompute": mode})
        mesh = ParallelDims.from_config(cfg, tp).build_mesh("cpu") if tp > 1 else None
        torch.manual_seed(0)  # the same weights on every rank, as tensor parallelism expects
        model = build_model(cfg.model).to(dtype)
        model = parallelize(model, cfg, mesh, device=torch.device("cpu")).parts[0]
        model.train()
        tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq))
        sizes.append(saved_bytes(model, tokens, tokens))
    return sizes[1] - sizes[0]


# The rows of Korthikanti et al.'s table 2 measured here: name → (tensor parallel, sequence parallel, recompute
# mode, sp_regather); tensor-parallel rows run on t gloo processes (t = --tp, 2 by default). The SP rows run with
# `parallel.sp_regather` (Megatron's layout, the paper's numbers) and, "gathered kept", without it.
GPT_ROWS = {"none": (False, False, "none", False), "selective": (False, False, "selective", False),
            "full": (False, False, "full", False), "tp": (True, False, "none", False),
            "tp+sp": (True, True, "none", True), "tp+selective": (True, False, "selective", False),
            "tp+sp+selective": (True, True, "selective", True),
            "tp+sp, gathered kept": (True, True, "none", False),
            "tp+sp+selective, gathered kept": (True, True, "selective", False)}


def formula(mode: str, *, t: int = 1, sp: bool = False) -> str:
    """The paper's bytes per layer for `mode` as text, at tensor-parallel size t (written out for t = 1)."""
    if mode == "full":
        return "2sbh/t" if sp else "2sbh"
    if t == 1:
        return "sbh(34 + 5as/h)" if mode == "none" else "34sbh"
    if mode == "none":
        return "sbh(34/t + 5as/(ht))" if sp else "sbh(10 + 24/t + 5as/(ht))"
    return "34sbh/t" if sp else "sbh(10 + 24/t)"


def formula_bytes(mode: str, *, s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False) -> float:
    """Korthikanti et al. 2022 (DESIGN §5): none sbh(10 + 24/t + 5as/(ht)), TP+SP sbh(34/t + 5as/(ht)), selective
    sbh(10 + 24/t) and 34sbh/t with SP, full 2sbh; at t = 1 none is sbh(34 + 5as/h) and selective 34sbh.
    Of the 34: 10 are replicated over the TP ranks without SP (the two LayerNorm inputs, the attention and MLP
    inputs, 2sbh each; the two residual dropout masks, sbh each), 24 are split with the heads and the MLP width."""
    if mode == "full":
        return 2 * s * b * h / (t if sp else 1)
    per_sbh = 34 / t if sp else 10 + 24 / t
    if mode == "none":
        per_sbh += 5 * a * s / (h * t)
    return s * b * h * per_sbh


def cpu_extra_bytes(mode: str, *, s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                    regather: bool = True) -> dict[str, float]:
    """The terms by which this build differs from the paper, each explained (bf16, unfused attention, t TP ranks):
    the paper stores dropout masks as 1 byte each, eager CPU dropout keeps them in the input's dtype (2 bytes);
    the unfused path materialises its causal mask (s² bools, per layer, not per sample, whole on every rank);
    LayerNorm keeps its mean and rstd (2 norms × 2 × sb, in bf16) which the paper neglects. Under SP without
    `regather` (`parallel.sp_regather` off), DTensor's all-gather before the attention and the MLP hands their first
    linears the gathered input, which autograd then keeps whole (2sbh each), where Megatron (and sp_regather) keeps
    the 2sbh/t shard and gathers it again in backward (two more all-gathers per block in exchange for the memory).
    Full recomputation keeps only block inputs."""
    if mode == "full":
        return {}
    shard = t if sp else 1  # what runs on the residual stream is split over the ranks only under SP
    extra = {"residual dropout masks at 2 bytes": 2 * s * b * h / shard, "layernorm mean and rstd": 8 * s * b / shard}
    if sp and not regather:
        extra["all-gathered attention and MLP inputs kept whole"] = 2 * (2 * s * b * h - 2 * s * b * h / t)
    if mode == "none":
        extra |= {"attention dropout mask at 2 bytes": a * s * s * b / t, "causal mask (s² bools)": s * s}
    return extra


def gpt_row(name: str, measured: list[int], *, s: int, b: int, h: int, a: int) -> dict:
    """One row of the formula check: `measured` holds each of the t ranks' bytes per layer (t = 1: one process)."""
    _, sp, mode, regather = GPT_ROWS[name]
    t = len(measured)
    expected = formula_bytes(mode, s=s, b=b, h=h, a=a, t=t, sp=sp)
    extra = cpu_extra_bytes(mode, s=s, b=b, h=h, a=a, t=t, sp=sp, regather=regather)
    unexplained = max(measured) - expected - sum(extra.values())
    return {"t": t, "sequence_parallel": sp, "sp_regather": regather, "recompute": mode, "formula": formula(mode, t=t, sp=sp),
            "measured_bytes": max(measured), "measured_bytes_per_rank": measured, "formula_bytes": expected,
            "measured_over_sbh": max(measured) / (s * b * h), "formula_over_sbh": expected / (s * b * h),
            "explained_extra_bytes": extra, "unexplained_bytes": unexplained,
            "unexplained_fraction": unexplained / expected, "within_3pct": abs(unexplained) <= 0.03 * expected}


def tp_rows_on_rank(names: list[str], s: int, b: int, h: int, a: int) -> dict[str, int]:
    """Run on each rank of a process group (its size is t): this rank's bytes per layer for each row in `names`."""
    # DTensor warns that its random ops (dropout) on a CPU mesh may not draw as on GPU; the masks' values do not
    # change the bytes counted here
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
    return {name: per_layer_bytes(GPT_ROWS[name][2], seq=s, batch=b, d_model=h, heads=a,
                                  sequence_parallel=GPT_ROWS[name][1], sp_regather=GPT_ROWS[name][3])
            for name in names}


def gpt_rows(*, s: int, b: int, h: int, a: int, tp: int = 2) -> dict[str, dict]:
    """All rows of GPT_ROWS, the tensor-parallel ones on `tp` gloo processes (tp = 1 skips them)."""
    from tests.dist import run_distributed  # the repository's gloo harness, as bench/comm.py uses it

    measured = {name: [per_layer_bytes(mode, seq=s, batch=b, d_model=h, heads=a)]
                for name, (tensor_parallel, _, mode, _) in GPT_ROWS.items() if not tensor_parallel}
    parallel = [name for name, (tensor_parallel, *_) in GPT_ROWS.items() if tensor_parallel]
    if tp > 1 and parallel:
        ranks = run_distributed(tp_rows_on_rank, tp, parallel, s, b, h, a)
        measured |= {name: [r[name] for r in ranks] for name in parallel}
    return {name: gpt_row(name, m, s=s, b=b, h=h, a=a) for name, m in measured.items()}


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


class SavedByModule:
    """Saved-for-backward bytes of one forward attributed to the innermost tagged module running when each tensor
    was saved (parameters excluded; each storage counted once, where first saved; those freed before the forward
    ended do not count). `tags`: {module: label}; what no tagged module saves goes under "other"."""

    def __init__(self, model: torch.nn.Module, tags: dict[torch.nn.Module, str]):
        self.params = {x.untyped_storage().data_ptr() for p in model.parameters() for x in _stored(p)}
        self.stack: list[str] = []
        self.saved: dict[int, tuple[str, weakref.ref]] = {}
        self.handles = []
        for module, label in tags.items():
            self.handles.append(module.register_forward_pre_hook(partial(self._enter, label)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, label: str, module, args) -> None:
        self.stack.append(label)

    def _leave(self, module, args, output) -> None:  # None: the module's output stays as it is
        self.stack.pop()

    def pack(self, t: torch.Tensor):
        for x in _stored(t):
            st = x.untyped_storage()
            if st.data_ptr() not in self.params and x.device.type != "meta" and st.data_ptr() not in self.saved:
                self.saved[st.data_ptr()] = (self.stack[-1] if self.stack else "other", weakref.ref(st))
        return t

    def by_label(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for label, ref in self.saved.values():
            st = ref()
            if st is not None:
                out[label] = out.get(label, 0) + st.nbytes()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def cp_saved_bytes(arch: str, *, seq: int, layers: int = 2, d_model: int = 64, heads: int = 4,
                   vocab: int = 256) -> dict[str, float]:
    """This process's saved bytes per layer by part (mixer, mlp, block_rest; ends: embedding, head and loss) for
    one forward of a tiny `arch` model, fp32, batch 1: inside a process group, context-parallel over all its ranks
    (`parallel.context_model.apply_cp`, what `parallelize` applies for parallel.cp, on the rank's zigzag part of
    the sequence with its global positions, as `ParallelModel.local_batch` cuts it); else one process, the whole
    sequence. No data-parallel wrapper: it only reduces gradients, and DDP's replicate would hand the forward
    weight copies that are not the parameters' storages."""
    cp = dist.get_world_size() if dist.is_initialized() else 1
    cfg = build_config({"model": {"arch": arch, "d_model": d_model, "n_heads": heads, "n_layers": layers,
                                  "seq_len": seq, "vocab_size": vocab}, "parallel": {"cp": cp}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    model.train()
    tokens = torch.randint(0, vocab, (1, seq))
    labels, inputs = tokens, {}
    if cp > 1:
        from parallel.context import ContextShard
        from parallel.context_model import apply_cp

        shard = ContextShard.from_group(dist.group.WORLD)
        apply_cp(model, shard, documents=False)
        tokens, labels = shard.split(tokens), shard.split(labels)  # (1, seq / cp) each
        inputs["position_ids"] = shard.positions(seq).unsqueeze(0)  # (1, seq / cp)
    tags = {}
    for block in model.layers.values():
        tags[block] = "block_rest"
        tags[block.mixer] = "mixer"
        tags[block.mlp] = "mlp"
    counter = SavedByModule(model, tags)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        out = model(tokens, labels=labels, **inputs)  # holds the graph while the storages are summed
        parts = counter.by_label()
    counter.close()
    del out
    per_layer = {k: parts.get(k, 0) / layers for k in ("mixer", "mlp", "block_rest")}
    return {**per_layer, "layer": sum(per_layer.values()), "ends": parts.get("other", 0), "local_steps": seq // cp}


def cp_rank_bytes(arch: str, seq: int) -> dict[str, float]:
    """`cp_saved_bytes` on one rank of a process group (positional arguments, for tests.dist.run_distributed)."""
    return cp_saved_bytes(arch, seq=seq)


def cp_rows(*, cp: int, seq: int, archs=ARCHS) -> dict[str, dict]:
    """Per architecture: cp = 1 (one process) and cp = `cp` (every rank's bytes) from `cp_saved_bytes`, with the
    per-rank / cp = 1 ratio of each part."""
    from tests.dist import run_distributed

    rows = {}
    for arch in archs:
        one = cp_saved_bytes(arch, seq=seq)
        ranks = run_distributed(cp_rank_bytes, cp, arch, seq)
        worst = {k: max(r[k] for r in ranks) for k in ("mixer", "mlp", "block_rest", "layer", "ends")}
        rows[arch] = {"cp1": one, f"cp{cp}_per_rank": ranks, f"cp{cp}_max_rank": worst,
                      "ratio": {k: worst[k] / one[k] for k in worst if one[k]}}
    return rows


def run_cp(*, cp: int, seq: int, out: str) -> dict:
    rows = cp_rows(cp=cp, seq=seq)
    print(f"\nsaved bytes per layer per rank, cp={cp} vs one process (fp32, d=64, 4 heads, 2 layers, T={seq}, batch 1)")
    print(f"{'arch':<12}{'part':<12}{'cp=1':>12}{f'cp={cp}':>12}{'ratio':>8}")
    for arch, row in rows.items():
        for part in ("mixer", "mlp", "block_rest", "layer", "ends"):
            print(f"{arch:<12}{part:<12}{row['cp1'][part]:>12.0f}{row[f'cp{cp}_max_rank'][part]:>12.0f}"
                  f"{row['ratio'].get(part, float('nan')):>8.3f}")
    result = {"command": f"python -m bench.memory --cp {cp} --cp-seq {seq}",
              "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}",
              "note": "saved-for-backward bytes of one forward (saved_tensors_hooks), parameters excluded, fp32, "
                      "batch 1, tiny models (d=64, 4 heads, 2 layers, vocab 256), attributed to the innermost of "
                      "mixer / mlp / block (norms, residual) running when saved, per layer; ends = embedding, LM head "
                      "and loss. cp ranks run parallel.cp on gloo (parallel.context_model.apply_cp, the model side of "
                      "parallelize). "
                      "ratio = the largest rank's bytes / one process's.",
              "seq": seq, "cp": cp, "rows": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"memory-cp{cp}-cpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the TP rows (gloo processes; 1 = skip)")
    ap.add_argument("--archs", action="store_true", help="also the four architectures with and without MsT")
    ap.add_argument("--arch-seq", type=int, default=1024, help="sequence length of the per-layer bytes")
    ap.add_argument("--max-seq", type=int, default=32768, help="longest sequence of the peak sweep")
    ap.add_argument("--out", default="bench/results", help="where the JSON files and the plot go")
    ap.add_argument("--cp", type=int, default=1, help="measure context parallelism at this cp (gloo processes) "
                                                      "against one process, and nothing else")
    ap.add_argument("--cp-seq", type=int, default=1024, help="sequence length of the --cp measurement")
    args = ap.parse_args(argv)
    if args.cp > 1:
        run_cp(cp=args.cp, seq=args.cp_seq, out=args.out)
        return
    s, b, h, a = args.seq, args.batch, args.d_model, args.heads
    rows = gpt_rows(s=s, b=b, h=h, a=a, tp=args.tp)
    result = {"command": "python -m bench.memory" + (f" --tp {args.tp}" if args.tp != 2 else ""),
              "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}",
              "preset": "gpt, attn_impl=unfused", "s": s, "b": b, "h": h, "a": a, "dtype": "bf16",
              "note": "bytes per layer on one rank (max over ranks; per rank in measured_bytes_per_rank); "
                      "explained_extra_bytes: where this build differs from the paper and why (bench/memory.py, "
                      "cpu_extra_bytes): 2-byte dropout masks (the paper: 1 byte), the unfused path's s^2 causal "
                      "mask, LayerNorm mean and rstd, and in the SP rows without parallel.sp_regather ('gathered "
                      "kept') the all-gathered attention and MLP inputs, which autograd then keeps whole where "
                      "Megatron (and parallel.sp_regather) keeps the shard and gathers again in backward; "
                      "unexplained = measured - formula - explained",
              "per_layer": rows}
    print(json.dumps(result))
    print(f"{'row':<31} {'t':>2} {'formula':<26} {'measured':>10} {'formula':>11} {'meas/sbh':>9} {'form/sbh':>9} "
          f"{'unexplained':>12}")
    for name, r in rows.items():
        print(f"{name:<31} {r['t']:>2} {r['formula']:<26} {r['measured_bytes']:>10} {r['formula_bytes']:>11.0f} "
              f"{r['measured_over_sbh']:>9.3f} {r['formula_over_sbh']:>9.3f} "
              f"{r['unexplained_bytes']:>8.0f} ({r['unexplained_fraction']:+.1%})")
        for term, nbytes in r["explained_extra_bytes"].items():
            print(f"{'':<31} + {term}: {nbytes:.0f} ({nbytes / (s * b * h):.3f} sbh)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory-gpt-cpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    if args.archs:
        run_archs(seq=args.arch_seq, max_seq=args.max_seq, out=args.out)


if __name__ == "__main__":
    main()
