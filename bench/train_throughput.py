"""Training throughput of one process: tokens/s, TFLOP/s and MFU per architecture, as JSON lines.

    python bench/train_throughput.py --arch transformer --d-model 768 --n-layers 12 --n-heads 12 \
        --seq-len 2048 --micro-batch 8 --steps 50

Each point builds the model, runs `--warmup` untimed optimizer steps then `--steps` timed ones on random
tokens (throughput does not depend on the data), bf16 autocast on CUDA, fp32 on CPU. Absolute numbers mean
something only on a GPU with its name reported; on CPU compare ratios between points of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import build_config  # noqa: E402
from pretrain.metrics import flops_per_token, peak_flops  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402


def measure(model_cfg: dict, *, micro_batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    cfg = build_config({}, {"model": model_cfg})
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.model.seq_len + 1), device=device)

    def step():
        with autocast:
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * micro_batch * cfg.model.seq_len / elapsed
    flops = flops_per_token(cfg.model) * tokens_per_s
    peak = peak_flops(device)
    return {
        "arch": cfg.model.arch, "params": sum(p.numel() for p in model.parameters()),
        "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers, "seq_len": cfg.model.seq_len,
        "micro_batch": micro_batch, "attn_impl": cfg.model.attn_impl, "tokens_per_s": round(tokens_per_s, 1),
        "tflops": round(flops / 1e12, 3), "mfu": round(flops / peak, 4) if peak else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "steps": steps,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["transformer"], help="architectures to measure")
    parser.add_argument("--d-model", type=int, default=256, help="hidden size")
    parser.add_argument("--n-layers", type=int, default=4, help="number of blocks")
    parser.add_argument("--n-heads", type=int, default=4, help="heads")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[512], help="sequence lengths to measure")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--attn-impl", default="auto", help="model.attn_impl")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per point")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for arch in args.arch:
        for seq_len in args.seq_len:
            model_cfg = {"arch": arch, "d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads,
                         "vocab_size": args.vocab_size, "seq_len": seq_len, "attn_impl": args.attn_impl}
            print(json.dumps(measure(model_cfg, micro_batch=args.micro_batch, steps=args.steps,
                                     warmup=args.warmup, device=device)), flush=True)


if __name__ == "__main__":
    main()
