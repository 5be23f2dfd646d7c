"""How long training is blocked by a synchronous and by an asynchronous checkpoint save (prints JSON).

    python bench/checkpoint.py                      # ~0.5B-parameter Transformer + AdamW state, 2 gloo processes
    python bench/checkpoint.py --check              # exit 0 iff async blocks at most half as long; ratio printed last
    python bench/checkpoint.py --config configs/transformer-125m.toml --device cuda     # the GPU suite's call
    python bench/checkpoint.py --d-model 512 --n-layers 4 --saves 3                    # a quick look

The model is sharded with FSDP2 over --nproc processes (gloo on CPU, NCCL on CUDA) and its AdamW state is filled
by one optimizer step, so each checkpoint holds the parameters and both moments (12 bytes per parameter, fp32).
Each mode saves --saves times through pretrain.checkpoint.Checkpointer (the training loop's own code: DCP,
checksums, publish, keep_last=1). `blocked_s` is how long save() kept the training loop waiting (the slowest
rank): the whole write for a synchronous save, the copy into host memory (pinned on CUDA) for an asynchronous
one. `background_s` is how long the asynchronous write then took to finish (its wait() right after the save,
with no training in between; for a synchronous save, the background deletion of the checkpoint before it);
training that runs longer than that between two saves never waits for it. The
first asynchronous save also allocates the host buffers that later saves reuse, so the ratio compares the last
save of each mode. On CPU the staging copy competes with writes still landing in the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint import Checkpointer  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.models import build_model  # noqa: E402

# ~0.52B parameters: GPT-2's padded vocabulary, 20 blocks of width 1280 (head size 128).
DEFAULT_MODEL = {"arch": "transformer", "d_model": 1280, "n_layers": 20, "n_heads": 10, "vocab_size": 50304,
                 "seq_len": 2048}
CHECK_LIMIT = 0.5


@dataclass
class CheckpointCfg:
    interval: int = 1
    keep_last: int = 1
    resume: str = "none"
    async_save: bool = False


def model_config(args):
    """The model of --config (or the ~0.5B default) with --d-model/--n-layers/--n-heads/--vocab-size on top."""
    overrides = {} if args.config else dict(DEFAULT_MODEL)
    for key in ("d_model", "n_layers", "n_heads", "vocab_size"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if not args.config and args.d_model and not args.n_heads:  # keep the default's head size of 128
        overrides["n_heads"] = max(1, args.d_model // 128)
    argv = (["--config", args.config] if args.config else []) + [f"--model.{k}={v}" for k, v in overrides.items()]
    return load_config(argv).model


def worker(rank: int, args, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.nproc)
    try:
        mcfg = model_config(args)
        with torch.device("meta"):
            model = build_model(mcfg)
        for block in model.layers.values():
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().normal_(0.0, 0.02)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        optimizer.step()  # allocates and fills both AdamW moments
        optimizer.zero_grad(set_to_none=True)
        n_params = sum(p.numel() for p in model.parameters())

        results = {}
        for mode in ("sync", "async"):
            run_dir = Path(args.dir) / mode
            ckpt = Checkpointer(CheckpointCfg(async_save=mode == "async"), run_dir,
                                run_config={"model": vars(mcfg)})
            blocked, background = [], []
            for step in range(1, args.saves + 1):
                dist.barrier()
                start = time.perf_counter()
                ckpt.save(step, model=model, optimizer=optimizer, state={})
                saved = time.perf_counter()
                ckpt.wait()
                done = time.perf_counter()
                times = [None] * args.nproc
                dist.all_gather_object(times, (saved - start, done - saved))
                blocked.append(round(max(t[0] for t in times), 3))
                background.append(round(max(t[1] for t in times), 3))
            ckpt.close()
            meta = json.loads((run_dir / f"checkpoints/step_{args.saves:08d}/meta.json").read_text())
            results[mode] = {"blocked_s": blocked, "background_s": background,
                             "checkpoint_bytes": sum(f["bytes"] for f in meta["files"].values())}
            dist.barrier()
            if rank == 0:
                shutil.rmtree(run_dir)
        if rank == 0:
            Path(out).write_text(json.dumps({"params": n_params, "model": vars(mcfg), **results}))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", help="a run's TOML: its model section is saved (default: ~0.5B Transformer)")
    parser.add_argument("--d-model", dest="d_model", type=int, help="override model.d_model")
    parser.add_argument("--n-layers", dest="n_layers", type=int, help="override model.n_layers")
    parser.add_argument("--n-heads", dest="n_heads", type=int, help="override model.n_heads")
    parser.add_argument("--vocab-size", dest="vocab_size", type=int, help="override model.vocab_size")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model lives (cuda: one process per GPU, NCCL)")
    parser.add_argument("--nproc", type=int, help="processes (default: 2 on CPU, the GPUs visible (at most 2) on CUDA)")
    parser.add_argument("--saves", type=int, default=2, help="saves per mode (default 2; the last is compared)")
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory, removed)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 0 iff async blocks at most {CHECK_LIMIT:g}× as long as sync; prints the ratio last")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is visible")
    args.nproc = args.nproc or (min(2, torch.cuda.device_count()) if args.device == "cuda" else 2)
    if args.saves < 1:
        parser.error("--saves must be at least 1")
    try:
        model_config(args)  # a bad --config or override fails here, once, instead of in every process
    except ConfigError as e:
        parser.error(str(e))

    scratch = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    args.dir = str(scratch)
    out = scratch / "result.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(worker, args=(args, port, str(out)), nprocs=args.nproc, join=True)
        measured = json.loads(out.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    ratio = measured["async"]["blocked_s"][-1] / measured["sync"]["blocked_s"][-1]
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    print(json.dumps({
        "bench": "checkpoint",
        "command": "python bench/checkpoint.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": gpu,
                    "torch": torch.__version__, "python": platform.python_version()},
        "device": args.device, "processes": args.nproc, "params": measured["params"],
        "model": {k: measured["model"][k] for k in ("arch", "d_model", "n_layers", "n_heads", "vocab_size")},
        "sync": measured["sync"], "async": measured["async"],
        "async_over_sync_blocked": round(ratio, 4),
    }, indent=1))
    if args.check:
        verdict = "ok" if ratio <= CHECK_LIMIT else "FAILED"
        print(f"async/sync blocked ratio {ratio:.4f} (limit {CHECK_LIMIT:g}): {verdict}")
        return 0 if ratio <= CHECK_LIMIT else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
