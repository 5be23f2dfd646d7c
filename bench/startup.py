"""Start-up memory and time per layout: what each process allocates from building the model to its first step.

    python bench/startup.py [--archs transformer,rwkv7] [--layouts dp2-fsdp,tp2,pp2-interleaved,dp2-tp2]
                            [--d-model 1536 --layers 12 --heads 12 --vocab 32000] [--out FILE]
    python bench/startup.py --check     # a smaller model, 2-way layouts; exit 0 iff every ratio is <= 0.6

Each layout runs the training loop's own start-up (`pretrain.train.build_parallel_model`, then the optimizers) on
gloo CPU processes and prints one JSON line per architecture and layout: the full model's parameter bytes (fp32,
`model_bytes`), and per rank the peak bytes allocated during start-up (`peak_bytes`), its ratio to the model bytes,
the parameter bytes the rank keeps (`kept_bytes`) and the seconds start-up took. The last line is a summary.

Peak bytes are the CPU allocator's own count: with `torch.profiler.profile(profile_memory=True)` c10's CPU allocator
reports every allocation and free made on the profiled (main) thread with its running total of bytes allocated
since profiling began; the peak is that total's maximum. Start-up runs on the main thread; a tensor a gloo thread
frees is not subtracted, so the count can only err high. Interpreter and library memory is not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = {  # name → (processes, parallel section)
    "dp2-fsdp": (2, {"dp": 2}),
    "tp2": (2, {"tp": 2}),
    "pp2-interleaved": (2, {"pp": 2, "pp_schedule": "interleaved_1f1b"}),
    "dp2-tp2": (4, {"dp": 2, "tp": 2}),
}
CHECK_RATIO = 0.6  # --check: the most a 2-way layout's start-up may allocate, as a fraction of the model


def model_section(arch: str, *, d_model: int, layers: int, heads: int, vocab: int) -> dict:
    """The benchmark's model: Llama-style Transformer or RWKV-7 (LayerNorm with bias, channel mix 4·d, head size 64,
    as configs/rwkv7-340m.toml) at the given size."""
    model = {"arch": arch, "d_model": d_model, "n_layers": layers, "vocab_size": vocab, "seq_len": 256}
    if arch == "rwkv7":
        return {**model, "n_heads": d_model // 64, "norm": "layernorm", "bias": True, "mlp_ratio": 4.0}
    return {**model, "n_heads": heads}


def allocator_peak(profiler) -> int:
    """The most CPU bytes allocated at once while `profiler` (profile_memory=True) ran, above what was allocated when
    it started (the allocator's running total also counts what earlier profiling sessions left)."""
    from torch._C._profiler import _ExtraFields_Allocation

    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if isinstance(node.extra_fields, _ExtraFields_Allocation):
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    if not events:
        return 0
    _, first_size, first_total = min(events)
    return max(total for _, _, total in events) - (first_total - first_size)


def start_up(parallel: dict, model: dict) -> dict:
    """One rank: the training loop's start-up under the profiler's allocation count."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.profiler import ProfilerActivity, profile

    from parallel.mesh import ParallelDims
    from pretrain.config import build_config
    from pretrain.optim import build_optimizer
    from pretrain.train import build_parallel_model

    cfg = build_config({"model": model, "parallel": parallel,
                        "train": {"global_batch": 4, "micro_batch": 1, "eval_interval": 0}})
    mesh = ParallelDims.from_config(cfg, dist.get_world_size()).build_mesh("cpu")
    device = torch.device("cpu")
    gc.collect()  # what an earlier start-up in this process left is freed before counting begins
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        started = time.perf_counter()
        net = build_parallel_model(cfg, mesh, device=device, param_dtype=None)
        optimizers = [build_optimizer(part, cfg.optim, device) for part in net.parts]
        seconds = time.perf_counter() - started
    kept = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in net.parameters())
    del optimizers
    return {"peak_bytes": allocator_peak(profiler), "kept_bytes": kept, "seconds": round(seconds, 2)}


def model_bytes(model: dict) -> int:
    from pretrain.config import build_config
    from pretrain.models import build_model

    with torch.device("meta"):
        net = build_model(build_config({"model": model}).model)
    return sum(p.numel() * 4 for p in net.parameters())  # fp32; a tied weight once


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"small model, 2-way layouts: exit 0 iff every peak/model ratio is <= {CHECK_RATIO}")
    parser.add_argument("--archs", default="transformer,rwkv7", help="comma-separated: transformer, fox, gla, rwkv7")
    parser.add_argument("--layouts", default=None, help=f"comma-separated, from: {', '.join(LAYOUTS)}")
    parser.add_argument("--d-model", type=int, default=None, help="hidden size (1536; --check: 512)")
    parser.add_argument("--layers", type=int, default=12, help="blocks, a multiple of 4")
    parser.add_argument("--heads", type=int, default=12, help="Transformer heads (RWKV-7: head size 64)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (32000; --check: 2048)")
    parser.add_argument("--out", default=None, help="also write the lines, with the machine, to this JSON file")
    args = parser.parse_args(argv)
    from tests.dist import run_distributed

    small = args.check
    size = {"d_model": args.d_model or (512 if small else 1536), "layers": args.layers,
            "heads": args.heads if not small else 8, "vocab": args.vocab or (2048 if small else 32000)}
    layouts = (args.layouts or ",".join(name for name, (world, _) in LAYOUTS.items() if not small or world == 2))
    rows = []
    for arch in args.archs.split(","):
        model = model_section(arch, **size)
        total = model_bytes(model)
        for name in layouts.split(","):
            world, parallel = LAYOUTS[name]
            ranks = run_distributed(start_up, world, parallel, model, timeout=1800)
            row = {"arch": arch, "layout": name, "processes": world, "model": model, "model_bytes": total,
                   "peak_bytes": [r["peak_bytes"] for r in ranks],
                   "ratio": [round(r["peak_bytes"] / total, 3) for r in ranks],
                   "kept_bytes": [r["kept_bytes"] for r in ranks], "seconds": [r["seconds"] for r in ranks]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    two_way = [row for row in rows if row["processes"] == 2]
    worst = max(two_way, key=lambda row: max(row["ratio"]), default=None)
    passed = worst is not None and max(worst["ratio"]) <= CHECK_RATIO
    summary = {"summary": "startup", "passed": passed, "limit": CHECK_RATIO,
               "max_ratio_2way": max(worst["ratio"]) if worst else None,
               "worst": f"{worst['arch']} {worst['layout']}" if worst else None,
               "max_ratio": {f"{row['arch']} {row['layout']}": max(row["ratio"]) for row in rows}}
    print(json.dumps(summary), flush=True)
    if args.out:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
        Path(args.out).write_text(json.dumps({"command": "python bench/startup.py " + " ".join(argv or sys.argv[1:]),
                                             "machine": machine, "rows": rows, "summary": summary}, indent=1) + "\n")
    return 0 if passed or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
