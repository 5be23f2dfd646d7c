"""Long context on CPU: the longest sequence whose training step fits a fixed per-process memory cap, cp=1 vs cp=2.

    python bench/long_context.py [--cap-mib 64] [--archs transformer,fox,gla,rwkv7] [--max-seq 65536]
                                 [--out bench/results/long-context-cpu-2core.json]

For each architecture (tiny but not trivial: d=64, 4 heads, 2 layers, vocab 256, fp32, batch 1) one process with
the whole sequence (cp=1) and two gloo processes with parallel.cp = 2 (each holding half of every sequence, in the
zigzag layout) run training steps at growing sequence lengths: doubling from --start, then a binary search over
multiples of --grid (a multiple of 2·cp) between the last length that fit and the first that did not.

How memory is measured (and capped). A step's peak is measured, not modelled: `bench.memory.PeakMemory` (a
TorchDispatchMode) follows every tensor storage created during forward, backward, the gradients' all-reduce over
cp and the AdamW update, adding its bytes when an op creates it and removing them when it is freed, and keeps the
high-water mark; to it we add what was resident before the step (parameters and AdamW's two moments, after a
warm-up step at a short length created them). The cap is checked against that sum, per process (the largest cp
rank). What it does not count: the Python interpreter, torch's libraries and thread pools, the allocator's cached
but unused blocks: the same for cp=1 and cp=2, and not part of what a longer sequence costs. RLIMIT_AS was not
used: torch reserves address space far beyond what it touches (thread stacks, OpenMP arenas), so a cap on it
measures the libraries rather than the step.

The step is the training run's model side: `parallel.context_model.apply_cp` (ring attention / state passing /
halos, the loss as the global mean over cp) on the rank's part of each sequence with its global positions, as
`ParallelModel.local_batch` cuts it; gradients are all-reduced over the cp ranks as DDP does (FSDP2 frees its
gathered weights by resizing storages, which a dispatch mode cannot see, so it would over-count here).

Writes the JSON (per architecture and cp: the longest length that fits, its peak, the first length that did not
and its peak, every probe with its seconds) and prints a small table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.memory import PeakMemory  # noqa: E402
from pretrain.config import build_config  # noqa: E402
from pretrain.models import build_model  # noqa: E402

ARCHS = ("transformer", "fox", "gla", "rwkv7")
MODEL = {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 256}


class Trainer:
    """A tiny model of `arch` on this process (cp = the process group's size, else 1) and its AdamW; `step(T)`
    trains on one random sequence of T tokens and returns the step's measured peak bytes on this process."""

    def __init__(self, arch: str, *, seq: int):
        self.cp = dist.get_world_size() if dist.is_initialized() else 1
        cfg = build_config({"model": {"arch": arch, **MODEL, "seq_len": seq}, "parallel": {"cp": self.cp}})
        torch.manual_seed(0)  # the same weights on every cp rank, as the trainer's initialisation gives
        self.model = build_model(cfg.model)
        self.model.init_weights()
        self.model.train()
        self.shard = None
        if self.cp > 1:
            from parallel.context import ContextShard
            from parallel.context_model import apply_cp

            self.shard = ContextShard.from_group(dist.group.WORLD)
            apply_cp(self.model, self.shard, documents=False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.generator = torch.Generator().manual_seed(1)

    def resident_bytes(self) -> int:
        """Parameters and optimizer states: what lives across steps."""
        tensors = list(self.model.parameters())
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def step(self, T: int) -> int:
        tokens = torch.randint(0, MODEL["vocab_size"], (1, T), generator=self.generator)  # the same on every rank
        inputs = {}
        if self.shard is not None:
            local = self.shard.split(tokens)  # (1, T / cp)  this rank's two zigzag chunks
            inputs["position_ids"] = self.shard.positions(T).unsqueeze(0)  # (1, T / cp)  their global positions
        else:
            local = tokens
        with PeakMemory() as mem:
            loss = self.model(local, labels=local, **inputs)
            loss.backward()
            if self.shard is not None:  # DDP's gradient sum over the cp ranks (global_mean_loss scales for it)
                for p in self.model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= self.cp
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return mem.peak


def search(arch: str, cap: int, start: int, grid: int, max_seq: int) -> dict:
    """On every process of the group (or alone): the longest multiple of `grid` whose step fits `cap` bytes on the
    largest process: doubling from `start`, then bisection. Every process probes the same lengths."""
    trainer = Trainer(arch, seq=max_seq)
    trainer.step(start)  # warm-up: AdamW's moments now exist
    resident = trainer.resident_bytes()
    probes = []

    def probe(T: int) -> bool:
        t0 = time.perf_counter()
        peak = resident + trainer.step(T)
        if dist.is_initialized():  # the cap holds per process: the largest rank decides
            worst = torch.tensor([peak], dtype=torch.int64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            peak = int(worst)
        probes.append({"seq": T, "peak_bytes": peak, "seconds": round(time.perf_counter() - t0, 2)})
        return peak <= cap

    fit, fail = 0, None
    T = start
    while T <= max_seq:
        if not probe(T):
            fail = T
            break
        fit, T = T, 2 * T
    if fit and fail:
        lo, hi = fit // grid, fail // grid  # in units of grid: lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(mid * grid):
                lo = mid
            else:
                hi = mid
        fit, fail = lo * grid, hi * grid
    peaks = {p["seq"]: p["peak_bytes"] for p in probes}
    return {"longest_seq": fit, "peak_bytes": peaks.get(fit), "first_over_cap": fail,
            "first_over_cap_peak_bytes": peaks.get(fail), "resident_bytes": resident, "probes": probes,
            "seconds": round(sum(p["seconds"] for p in probes), 1)}


def run(archs, *, cap: int, start: int, grid: int, max_seq: int, threads: int) -> dict:
    from tests.dist import run_distributed

    torch.set_num_threads(threads)  # one thread per process, as the 2 cp processes get
    rows = {}
    for arch in archs:
        one = search(arch, cap, start, grid, max_seq)
        two = run_distributed(search, 2, arch, cap, start, grid, max_seq)[0]
        rows[arch] = {"cp1": one, "cp2": two,
                      "gain": two["longest_seq"] / one["longest_seq"] if one["longest_seq"] else None}
        print(f"{arch:<12} cp=1 {one['longest_seq']:>7}  cp=2 {two['longest_seq']:>7}  "
              f"({one['seconds']:.0f} s, {two['seconds']:.0f} s)", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cap-mib", type=float, default=64, help="per-process cap on a step's measured peak, MiB")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, from: " + ", ".join(ARCHS))
    ap.add_argument("--start", type=int, default=512, help="first sequence length tried (a multiple of --grid)")
    ap.add_argument("--grid", type=int, default=256, help="lengths are multiples of this (a multiple of 2·cp = 4)")
    ap.add_argument("--max-seq", type=int, default=65536, help="longest length tried")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", default="bench/results/long-context-cpu-2core.json", help="the JSON written")
    args = ap.parse_args(argv)
    if args.grid % 4 or args.start % args.grid:
        ap.error("--grid must be a multiple of 2·cp = 4, and --start a multiple of --grid")
    cap = int(args.cap_mib * 2**20)
    t0 = time.perf_counter()
    rows = run(args.archs.split(","), cap=cap, start=args.start, grid=args.grid, max_seq=args.max_seq,
               threads=args.threads)
    table = [f"{'arch':<12}{'cp=1 longest':>14}{'cp=2 longest':>14}{'gain':>7}"
             f"   (cap {args.cap_mib:g} MiB per process)"]
    for arch, r in rows.items():
        gain = f"{r['gain']:.2f}" if r["gain"] else "-"
        table.append(f"{arch:<12}{r['cp1']['longest_seq']:>14}{r['cp2']['longest_seq']:>14}{gain:>7}")
    print("\n".join(table))
    result = {"command": "python bench/long_context.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
                         f"{args.threads} thread(s) per process",
              "model": {**MODEL, "dtype": "fp32", "batch": 1},
              "cap_bytes": cap,
              "method": "per process: parameters + AdamW moments (resident) + the measured high-water mark of live "
                        "tensor storages over one training step (bench.memory.PeakMemory: forward, backward, the "
                        "gradients' all-reduce over cp, AdamW); cp=2: the largest rank. Lengths: doubling from "
                        f"{args.start}, then bisection over multiples of {args.grid}.",
              "seconds": round(time.perf_counter() - t0, 1), "table": table, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
