"""Pretrain one of the four architectures: `python -m pretrain.train --config FILE [--section.key=value ...]`.

bootstrap → data → build on meta → parallelize → init → resume → loop (lr → micro-steps → clip → step →
log → validate → checkpoint). Runs the same under torchrun, or as a single process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.simple import Loader, ValLoader, check_tokenizer, check_vocab
from launch.bootstrap import init_distributed, shutdown
from parallel.data_parallel import no_grad_sync
from parallel.parallelize import parallelize
from pretrain.checkpoint import Checkpointer
from pretrain.config import Config, ConfigError, load_config, validate_world
from pretrain.metrics import MetricsLogger, flops_per_token, peak_flops
from pretrain.models import build_model
from pretrain.optim import build_optimizer, lr_at

log = logging.getLogger("pretrain")


def mean_across_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def any_rank(flag: bool) -> bool:
    """True if `flag` is set on any rank, so every rank takes the same branch (e.g. exit and save)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train_step(model, optimizer, micro_batches, *, lr: float, grad_clip: float, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the accumulated micro-batches; returns (mean loss on this rank, grad norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (tokens, labels) in enumerate(micro_batches):
        with no_grad_sync(model, sync=i == len(micro_batches) - 1), autocast:
            loss = model(tokens, labels=labels) / len(micro_batches)
        loss.backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


@torch.no_grad()
def evaluate(model, batches, autocast) -> float:
    model.eval()
    losses = []
    for tokens, labels in batches:
        with autocast:
            losses.append(model(tokens, labels=labels).float())
    model.train()
    return mean_across_ranks(torch.stack(losses).mean())


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA device is visible; use train.device=auto.")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: Config) -> list[float]:
    """Run (or resume) the configured training; returns this process's per-step mean losses."""
    t_start = time.monotonic()
    device = pick_device(cfg.train.device, 0)
    env = init_distributed(device.type)
    device = pick_device(cfg.train.device, env.local_rank)
    dp = validate_world(cfg, env.world_size)
    is_main = env.rank == 0
    run_dir = Path(cfg.train.run_dir)
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext())

    # Data first: a data/tokenizer mismatch should fail before any model memory is allocated.
    check_vocab(cfg.data.path, cfg.model.vocab_size)
    check_tokenizer(cfg.data.path, cfg.data.tokenizer)
    seq_len, micro = cfg.model.seq_len, cfg.train.micro_batch
    loader = Loader(cfg.data.path, "train", seq_len=seq_len, micro_batch=micro, dp_rank=env.rank,
                    dp_size=dp, seed=cfg.train.seed)
    val_loader = ValLoader(cfg.data.path, "val", seq_len=seq_len, micro_batch=micro, dp_rank=env.rank, dp_size=dp)
    grad_accum = cfg.train.global_batch // (micro * dp)

    # Build on the meta device (no memory), lay out, then materialise and initialise identically everywhere.
    seed_everything(cfg.train.seed)
    with torch.device("meta"):
        model = build_model(cfg.model)
    model.to_empty(device=device)
    model.init_weights()
    model = parallelize(model, dp=dp, device=device)
    optimizer = build_optimizer(model, cfg.optim, device)
    seed_everything(cfg.train.seed + 1 + env.rank)  # dropout differs across ranks, as different data does

    ckpt = Checkpointer(cfg.checkpoint, run_dir, run_config=cfg.to_dict())
    resumed = ckpt.load(model=model, optimizer=optimizer)
    step, tokens_seen = 0, 0
    if resumed:
        step = resumed["step"]
        loader.load_state_dict(resumed["state"]["data"])
        tokens_seen = resumed["state"]["tokens_seen"]

    flops = flops_per_token(cfg.model)
    peak = peak_flops(device)
    logger = MetricsLogger(run_dir, enabled=is_main, start_step=step, total_steps=cfg.train.steps,
                           tensorboard=cfg.log.tensorboard, progress=cfg.log.progress)
    tokens_per_step = cfg.train.global_batch * seq_len
    losses, steps_this_run = [], 0
    window_start, window_steps = time.monotonic(), 0
    model.train()
    while step < cfg.train.steps:
        step += 1
        micro_batches = [tuple(t.to(device, non_blocking=True) for t in next(loader)) for _ in range(grad_accum)]
        loss, grad_norm = train_step(model, optimizer, micro_batches, lr=lr_at(step, cfg.optim, cfg.train.steps),
                                     grad_clip=cfg.optim.grad_clip, autocast=autocast)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(
                f"non-finite loss/gradient at step {step} (loss {loss.item()}, grad norm {grad_norm.item()}); "
                f"nothing was saved for it. Resuming restarts from the newest complete checkpoint in "
                f"{run_dir / 'checkpoints'}: lower optim.lr, raise optim.warmup_steps or check the data.")
        tokens_seen += tokens_per_step
        steps_this_run += 1
        window_steps += 1
        losses.append(mean_across_ranks(loss))

        if step % cfg.log.interval == 0 or step == cfg.train.steps:
            elapsed = time.monotonic() - window_start
            tokens_per_s = window_steps * tokens_per_step / elapsed
            achieved = tokens_per_s * flops / env.world_size  # FLOP/s per device
            metrics = {"loss": losses[-1], "lr": lr_at(step, cfg.optim, cfg.train.steps),
                       "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s,
                       "tflops_per_gpu": achieved / 1e12, "mfu": achieved / peak if peak else None,
                       "tokens_seen": tokens_seen, "epoch": loader.epoch,
                       "memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
            if cfg.train.eval_interval and (step % cfg.train.eval_interval == 0 or step == cfg.train.steps):
                batches = [tuple(t.to(device) for t in b) for b in val_loader.batches(cfg.train.eval_batches)]
                val_loss = evaluate(model, batches, autocast)
                metrics.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            logger.log(step, metrics)
            window_start, window_steps = time.monotonic(), 0

        exiting = 0 < cfg.train.exit_after_steps <= steps_this_run
        if cfg.train.exit_after_minutes:  # ranks' clocks differ: agree, so all of them save and stop together
            exiting |= any_rank((time.monotonic() - t_start) / 60 >= cfg.train.exit_after_minutes)
        if ckpt.due(step) or exiting or step == cfg.train.steps:
            ckpt.save(step, model=model, optimizer=optimizer,
                      state={"data": loader.state_dict(), "tokens_seen": tokens_seen})
        if exiting and step < cfg.train.steps:
            if is_main:
                print(f"exiting after step {step} as configured; resume with the same command", flush=True)
            break
    logger.close()
    return losses


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    try:
        train(cfg)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
