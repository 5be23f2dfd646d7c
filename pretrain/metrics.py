"""FLOPs per token, MFU, and the three places metrics go: console progress, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from pretrain.config import ModelConfig, layer_config
from pretrain.ops.gla import CHUNK_SIZE

# Dense bf16 tensor-core peaks in FLOP/s (vendor data sheets; "dense" = without 2:4 sparsity).
# Matched against torch.cuda.get_device_name() in order, so more specific names come first.
GPU_PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of one device, or None where it is unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_BF16 if key in name), None)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all but the input token and position embeddings.

    Counted on a meta-device build, so the number is exact for every architecture and costs no memory.
    The LM head is included (its matmul runs even when tied to the embedding).
    """
    from pretrain.models import build_model  # models import config only; a top-level import would cycle

    with torch.device("meta"):
        model = build_model(cfg)
    embeddings = {id(p) for name, p in model.named_parameters() if name.startswith(("tok_emb", "pos_emb"))}
    total = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    if cfg.tie_embeddings:
        total += model.lm_head.weight.numel()
    return total


def flops_per_token(cfg: ModelConfig, *, seq_len: int | None = None, causal: bool = False,
                    chunk_size: int = CHUNK_SIZE, attention_span: float | None = None) -> float:
    """Model FLOPs of one training step (forward + backward) per token: matmul work only.

        6 · N  +  Σ_layers mixer

    N = `matmul_params(cfg)`: every weight multiplies each token once forward and twice backward (2 + 4
    FLOPs). That covers every projection, low-rank LoRAs and the LM head included; N also holds norm scales
    and RWKV-7's per-channel vectors, a negligible 6 FLOPs each. `mixer` is the sequence mixer's own matmul
    work beyond its projections, per layer and token, 3 × forward (backward = 2 × forward, as for any matmul):

    - transformer, fox: QKᵀ and the probabilities times V cost 2·s·d each forward, so mixer = 12·s·d over
      the full s×s square, as Megatron-LM and torchtitan count it; `causal=True` halves it (the causal half,
      as FlashAttention's benchmarks count it). The unfused path computes the full square; FoX's blockwise
      torch path skips tiles above the diagonal (block granularity) and its backward recomputes QKᵀ
      (hardware FLOPs, not model FLOPs: not counted). Under document masking a query only sees its own document:
      `attention_span` (see `attention_span`) replaces s, so the count is Σ over documents of their squared
      lengths, the work a document-masked kernel does.
    - gla, rwkv7: the matmuls of the chunkwise algorithm in `pretrain.ops` with chunk C = min(chunk_size, s),
      never an s² term; per head with key/value widths K, V:
        gla:   intra-chunk scores QKᵀ and their product with V 2·C·(K + V), state read-out and each chunk's
               own key-value sum 4·K·V.
        rwkv7: scores of a and r against k and b 8·C·K, three score × value products 6·C·V, the unit-lower
               triangular solve of the WY transform C·(K + V) (half a dense product), the chunk's state
               map b̃ᵀW' 2·K², read-outs and key-value sums 8·K·V, the sequential [K, K] @ [K, V] per chunk
               2·K²·V / C.
      The default C is the torch path's `CHUNK_SIZE` (both ops). fla's kernels (CUDA) chunk GLA by 64 and
      RWKV-7 by 16 and organise the work differently, so on GPU the count is an estimate of the algorithm, not of the
      kernel; pass `chunk_size` to estimate with theirs. `causal` does not apply.

    A hybrid (model.arch='hybrid') adds each layer's own mixer term; `flops_by_layer` gives the same total split
    into the LM head's share and each layer's (its parameters' 6 · n plus its mixer's term), which pipeline
    balancing and the performance model use.

    Not counted: elementwise work (activations, gates and decays, the pairwise decay products inside each
    8-step sub-chunk, softmax, FoX's c_i − c_j on every logit and its O(s) forget-gate cumulative sum), the
    norms' arithmetic, the loss.
    """
    return 6 * matmul_params(cfg) + sum(mixer_flops_per_token(layer_config(cfg, i), seq_len=seq_len, causal=causal,
                                                            chunk_size=chunk_size, attention_span=attention_span)
                                        for i in range(cfg.n_layers))


def mixer_flops_per_token(cfg: ModelConfig, *, seq_len: int | None = None, causal: bool = False,
                          chunk_size: int = CHUNK_SIZE, attention_span: float | None = None) -> float:
    """One layer's `mixer` term of `flops_per_token` (training, per token) for the pure model config `cfg` (a
    hybrid's `layer_config`): the mixer's own matmuls beyond its projections."""
    s = seq_len or cfg.seq_len
    d, H = cfg.d_model, cfg.n_heads
    if cfg.arch in ("transformer", "fox"):
        span = s if attention_span is None else attention_span
        return 12 * span * d * (0.5 if causal else 1.0)
    if cfg.arch == "gla":
        return 3 * H * _gla_forward_flops(min(chunk_size, s), d // 2 // H, d // H)
    return 3 * H * _rwkv7_forward_flops(min(chunk_size, s), d // H, d // H)


def flops_by_layer(cfg: ModelConfig, *, seq_len: int | None = None, causal: bool = False,
                   chunk_size: int = CHUNK_SIZE, attention_span: float | None = None) -> tuple[list[float], float]:
    """`flops_per_token` split into (each layer's FLOPs per token, the LM head's and final norm's), which sum to it.
    A layer's share is 6 × its parameters plus its mixer's term; the embeddings are lookups (no FLOPs), and a tied LM
    head counts its matmul as `matmul_params` does. Counted on a meta-device build (no memory)."""
    from pretrain.models import build_model  # models import config only; a top-level import would cycle

    with torch.device("meta"):
        model = build_model(cfg)
    layer_params = [sum(p.numel() for p in block.parameters()) for block in model.layers.values()]
    head = 6 * (matmul_params(cfg) - sum(layer_params))
    layers = [6 * n + mixer_flops_per_token(layer_config(cfg, i), seq_len=seq_len, causal=causal,
                                            chunk_size=chunk_size, attention_span=attention_span)
              for i, n in enumerate(layer_params)]
    return layers, head


def attention_span(position_ids: torch.Tensor) -> float:
    """Σ over document pieces of their squared lengths ÷ tokens, for in-document position ids (B, T): the number of
    keys a query sees per token under document masking, counted over each document's full square (as s is without
    masking). Pieces are cut at row starts and document starts (id 0)."""
    starts = position_ids == 0
    starts[:, 0] = True
    edges = torch.nonzero(torch.cat([starts.reshape(-1), torch.ones(1, dtype=torch.bool)])).squeeze(1)  # (N + 1,)
    lengths = (edges[1:] - edges[:-1]).double()  # (N,)
    return float((lengths ** 2).sum() / position_ids.numel())


def _gla_forward_flops(C: int, K: int, V: int) -> float:
    """Forward matmul FLOPs per head and token of `ops.gla`'s chunkwise algorithm with chunk C."""
    return 2 * C * (K + V) + 4 * K * V


def _rwkv7_forward_flops(C: int, K: int, V: int) -> float:
    """Forward matmul FLOPs per head and token of `ops.rwkv7`'s chunkwise algorithm with chunk C."""
    intra_chunk = 8 * C * K + 6 * C * V + C * (K + V)
    state = 2 * K * K + 8 * K * V + 2 * K * K * V / C
    return intra_chunk + state


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class MetricsLogger:
    """Rank 0 writes `<run_dir>/metrics.jsonl`, TensorBoard scalars under `<run_dir>/tb/` and a console line.

    On resume from step k, rows and events after k are dropped first, so the files always describe one
    consistent run (TensorBoard's `purge_step` does the same for event files).
    """

    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int, total_steps: int,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled, self.progress, self.total_steps = enabled, progress, total_steps
        self.start_step, self.start_time = start_step, time.monotonic()
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = run_dir / "metrics.jsonl"
        if self.jsonl_path.exists():
            rows = [line for line in self.jsonl_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.jsonl_path.write_text("".join(row + "\n" for row in rows))
        self.jsonl = self.jsonl_path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    # Console names → TensorBoard tags, grouped the way Megatron / torchtitan users look for them.
    TB_TAGS = {
        "loss": "loss/train", "lr": "optim/lr", "grad_norm": "optim/grad_norm",
        "tokens_per_s": "throughput/tokens_per_s", "tflops_per_gpu": "throughput/tflops_per_gpu",
        "mfu": "throughput/mfu", "memory_gb": "memory/peak_gb",
        "val_loss": "loss/val", "val_ppl": "loss/val_ppl",
    }

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if key in self.TB_TAGS and value is not None:
                    self.tb.add_scalar(self.TB_TAGS[key], value, step)
                    if key in ("loss", "val_loss") and "tokens_seen" in metrics:
                        self.tb.add_scalar(self.TB_TAGS[key] + "_vs_tokens", value, metrics["tokens_seen"])
            self.tb.flush()
        if self.progress:
            print(self.summary(step, metrics), flush=True)

    def summary(self, step: int, m: dict) -> str:
        elapsed = time.monotonic() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        if "loss" in m:
            parts.append(f"loss {m['loss']:.4f}")
        if "val_loss" in m:
            parts.append(f"val {m['val_loss']:.4f} (ppl {m['val_ppl']:.2f})")
        if "lr" in m:
            parts.append(f"lr {m['lr']:.2e}")
        if "grad_norm" in m:
            parts.append(f"gnorm {m['grad_norm']:.3f}")
        if "tokens_per_s" in m:
            parts.append(f"{_si(m['tokens_per_s'])} tok/s")
        if m.get("mfu") is not None:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        if m.get("memory_gb") is not None:
            parts.append(f"mem {m['memory_gb']:.1f}GB")
        parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
