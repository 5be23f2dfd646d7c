"""Activation memory per layer of the `gpt` preset (bf16, unfused attention), measured against Korthikanti et al.

    python -m bench.memory [--seq 512] [--batch 1] [--d-model 256] [--heads 8]

Saved-activation bytes are the distinct storages autograd keeps for backward during one forward
(`torch.autograd.graph.saved_tensors_hooks`), parameters excluded; per layer = (L layers) − (L − 1 layers).
Prints one JSON object, then a table of measured vs formula bytes per layer for recompute none / selective / full.
Also home of `PeakMemory`, the live-tensor peak on CPU that the mini-sequence test uses.
"""

from __future__ import annotations

import argparse
import json
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
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


if __name__ == "__main__":
    main()
