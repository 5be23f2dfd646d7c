"""FLOPs per token, MFU, and the three places metrics go: console progress, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from pretrain.config import ModelConfig

# Dense bf16 tensor-core peaks in FLOP/s (vendor data sheets; "dense" = without 2:4 sparsity).
# Matched against torch.cuda.get_device_name() in order, so more specific names come first.
GPU_PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]

LINEAR_CHUNK = 64  # chunk size the FLOP count assumes for the chunkwise linear-attention mixers


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


def flops_per_token(cfg: ModelConfig, *, seq_len: int | None = None, causal: bool = False) -> float:
    """Training FLOPs (forward + backward) per token.

        6 · N  +  L · mixer_term

    N = `matmul_params(cfg)` (every weight multiplies each token once forward, twice backward: 2 + 4).
    Softmax attention (transformer, fox): QKᵀ and AV each cost 2·s·h per token forward, so the
    mixer term is 3 · 4·s·h = 12·s·h, counted over the full s×s square as Megatron-LM and torchtitan count
    it (causal=True halves it, as FlashAttention's benchmarks do). The forget gate adds O(s) work, not counted.
    Linear mixers (gla, rwkv7) count the matmuls of the chunkwise algorithm with chunk C = 64 and no s²
    term: per head and token, intra-chunk scores and their product with values 2·C·(K + V), state read-out
    and update 4·K·V; RWKV-7's diagonal-plus-low-rank transition doubles both (the a/b terms).
    """
    s = seq_len or cfg.seq_len
    h = cfg.d_model
    if cfg.arch in ("transformer", "fox"):
        mixer = 12 * s * h * (0.5 if causal else 1.0)
    else:
        key_dim = h // 2 if cfg.arch == "gla" else h  # GLA's keys are half width (Yang et al. 2023)
        K, V = key_dim / cfg.n_heads, h / cfg.n_heads
        per_head = 2 * LINEAR_CHUNK * (K + V) + 4 * K * V
        mixer = 3 * cfg.n_heads * per_head * (2 if cfg.arch == "rwkv7" else 1)
    return 6 * matmul_params(cfg) + cfg.n_layers * mixer


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
        "mfu": "throughput/mfu", "memory_gb": "memory/max_allocated_gb",
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
