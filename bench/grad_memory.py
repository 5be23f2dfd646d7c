"""Gradient bytes each rank holds between the micro-steps of gradient accumulation, per data-parallel layout.

    python bench/grad_memory.py [--layouts dp2-fsdp,dp2-fsdp-once,...] [--d-model 512 --layers 8 --vocab 8192]
                                [--micro-steps 4] [--out FILE]

Each layout runs the training loop's own step (`pretrain.train.train_step`) on gloo CPU processes and prints one
JSON line: the full model's fp32 parameter bytes (`model_bytes`, = its fp32 gradients), the largest FSDP unit's
(`unit_bytes`: a block, or the embeddings + final norm + LM head that the root unit holds), and per rank the bytes
that micro-steps 1..k-1 of an optimizer step leave allocated when micro-step k starts, for k = 2..m (`held_bytes`
the largest, `per_micro_step` each). That is the accumulated gradients, plus, with reshard_after_forward off, the
parameters FSDP keeps gathered; `bound` is what it should be at most: model/dp_shard + one unit (sharded
gradients), or the model (gradients accumulated unsharded, and DDP), plus the model again for parameters kept
gathered. The last line is a summary.

Bytes are what the process holds from malloc, on every thread (glibc's `mallinfo2()`: bytes in use in all arenas
plus mmap-ed chunks), where torch's CPU allocator gets tensor memory. A forward pre-hook reads it at the start of
each micro-step's forward, before FSDP gathers anything; held = that minus the reading at the step's first
micro-step, whose gradients are still unallocated. The collector runs first, so garbage cycles (a finished
micro-step's autograd objects) are not counted. What else stays allocated (interpreter objects, gloo's buffers) came
to ~0.3 MiB whatever the model's size; `bound` allows SLACK_BYTES for it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = {  # name → (processes, parallel section)
    "dp2-fsdp": (2, {"dp": 2}),
    "dp2-fsdp-once": (2, {"dp": 2, "fsdp_reduce_every_micro_step": False}),
    "dp2-fsdp-keep": (2, {"dp": 2, "reshard_after_forward": False}),
    "dp2-ddp": (2, {"dp": 2, "data_parallel": "ddp"}),
    "dp4-fsdp": (4, {"dp": 4}),
    "hsdp-r2s2": (4, {"dp_replicate": 2, "dp_shard": 2}),
    "hsdp-r2s2-once": (4, {"dp_replicate": 2, "dp_shard": 2, "fsdp_reduce_every_micro_step": False}),
}
SLACK_BYTES = 2**20  # what else a micro-step leaves allocated: ~0.3 MiB measured, whatever the model's size


def model_section(*, d_model: int, layers: int, vocab: int) -> dict:
    return {"arch": "transformer", "d_model": d_model, "n_layers": layers, "n_heads": max(1, d_model // 64),
            "vocab_size": vocab, "seq_len": 64}


def sizes(model: dict) -> tuple[int, int]:
    """(fp32 bytes of the whole model, of its largest FSDP unit: a block or the root's own parameters)."""
    from pretrain.config import build_config
    from pretrain.models import build_model

    with torch.device("meta"):
        net = build_model(build_config({"model": model}).model)
    total = sum(p.numel() * 4 for p in net.parameters())
    blocks = [sum(p.numel() * 4 for p in block.parameters()) for block in net.layers.values()]
    return total, max(blocks + [total - sum(blocks)])


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2, every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_bytes() -> int:
    """Bytes this process holds from malloc, all threads: in use in the arenas plus mmap-ed chunks (glibc ≥ 2.33)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def held_gradient_bytes(parallel: dict, model: dict, micro_steps: int) -> dict:
    """One rank: after a warm-up step, the bytes each micro-step's start finds still held from the step's earlier
    micro-steps (see the module docstring)."""
    import torch.distributed as dist

    from parallel.mesh import ParallelDims
    from pretrain.config import build_config
    from pretrain.optim import build_optimizer
    from pretrain.train import build_parallel_model, train_step

    world = dist.get_world_size()
    cfg = build_config({"model": model, "parallel": parallel,
                        "train": {"global_batch": micro_steps * world, "micro_batch": 1, "eval_interval": 0}})
    dims = ParallelDims.from_config(cfg, world)
    device = torch.device("cpu")
    net = build_parallel_model(cfg, dims.build_mesh("cpu"), device=device, param_dtype=None)
    optimizers = [build_optimizer(part, cfg.optim, device) for part in net.parts]
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_steps, 1, cfg.model.seq_len))
    batches = [(t, t) for t in tokens]

    def step():
        train_step(net, optimizers, batches, lr=1e-4, grad_clip=1.0, autocast=torch.autocast("cpu", enabled=False))

    step()  # warm-up: FSDP's lazy initialisation and the optimizer states are not what is measured
    readings = []

    def read(module, args) -> None:
        gc.collect()  # a finished micro-step's garbage cycles are not what the step holds
        readings.append(heap_bytes())

    # prepended, so it reads before FSDP's own pre-forward hook gathers anything
    hook = net.parts[0].register_forward_pre_hook(read, prepend=True)
    step()
    hook.remove()
    return {"held_bytes": [n - readings[0] for n in readings[1:]], "dp_shard": dims.dp_shard}


def bound(parallel: dict, *, model_bytes: int, unit_bytes: int, dp_shard: int) -> int:
    """The most a rank should hold between micro-steps under `parallel` (see the module docstring)."""
    fsdp = parallel.get("data_parallel", "fsdp") == "fsdp"
    sharded = fsdp and parallel.get("fsdp_reduce_every_micro_step", True)
    grads = model_bytes // dp_shard + unit_bytes if sharded else model_bytes
    gathered = model_bytes if fsdp and not parallel.get("reshard_after_forward", True) else 0
    return grads + gathered + SLACK_BYTES


def measure(name: str, model: dict, *, micro_steps: int) -> dict:
    """One layout's JSON row."""
    from tests.dist import run_distributed

    world, parallel = LAYOUTS[name]
    model_bytes, unit_bytes = sizes(model)
    ranks = run_distributed(held_gradient_bytes, world, parallel, model, micro_steps, timeout=1800)
    held = [max(r["held_bytes"]) for r in ranks]
    limit = bound(parallel, model_bytes=model_bytes, unit_bytes=unit_bytes, dp_shard=ranks[0]["dp_shard"])
    return {"layout": name, "processes": world, "parallel": parallel, "micro_steps": micro_steps,
            "model_bytes": model_bytes, "unit_bytes": unit_bytes, "held_bytes": held,
            "ratio": [round(n / model_bytes, 3) for n in held], "bound": limit,
            "within_bound": max(held) <= limit, "per_micro_step": [r["held_bytes"] for r in ranks]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, from: {', '.join(LAYOUTS)}")
    parser.add_argument("--d-model", type=int, default=512, help="hidden size (heads of 64)")
    parser.add_argument("--layers", type=int, default=8, help="blocks")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary")
    parser.add_argument("--micro-steps", type=int, default=4, help="micro-steps per optimizer step on each rank")
    parser.add_argument("--out", default=None, help="also write the lines, with the machine, to this JSON file")
    args = parser.parse_args(argv)
    model = model_section(d_model=args.d_model, layers=args.layers, vocab=args.vocab)
    rows = []
    for name in args.layouts.split(","):
        rows.append(measure(name, model, micro_steps=args.micro_steps))
        print(json.dumps(rows[-1]), flush=True)
    summary = {"summary": "grad_memory", "all_within_bound": all(row["within_bound"] for row in rows),
               "max_ratio": {row["layout"]: max(row["ratio"]) for row in rows}}
    print(json.dumps(summary), flush=True)
    if args.out:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
        command = "python bench/grad_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out).write_text(json.dumps({"command": command, "machine": machine, "rows": rows,
                                              "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
