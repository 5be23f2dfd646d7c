"""Pretrain one of the four architectures: `python -m pretrain.train --config FILE [--section.key=value ...]`.

bootstrap → data → build on meta → parallelize → init → resume → loop (lr → micro-steps → clip → step →
log → validate → checkpoint). Runs the same under torchrun, or as a single process.
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import math
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.stream import (SYNTHETIC, Loader, SyntheticLoader, ValLoader, check_tokenizer, check_vocab,
                         open_manifests)
from launch.bootstrap import end_process, init_distributed, report_error, shutdown
from launch.preemption import JobControl, stop_on_signals
from parallel.data_parallel import set_gradient_sync
from parallel.mesh import ParallelDims
from parallel.parallelize import ParallelModel, parallelize
from parallel.random import seed_streams
from pretrain.checkpoint import Checkpointer, CheckpointError, RunLock, UnsafeCheckpointError
from pretrain.config import Config, ConfigError, kernel_warning, load_config
from pretrain.metrics import MetricsLogger, attention_span, flops_per_token, peak_flops
from pretrain.models import build_model
from pretrain.models.common import at_least_fp32
from pretrain.optim import build_optimizer, lr_at

log = logging.getLogger("pretrain")


def mean_across_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def model_inputs(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict]:
    """A loader batch (tokens, labels[, position_ids]) as the model's (tokens, keyword arguments)."""
    tokens, labels, *position_ids = batch
    return tokens, {"labels": labels, "position_ids": position_ids[0] if position_ids else None}


def train_step(model: ParallelModel, optimizers, micro_batches, *, lr: float, grad_clip: float,
               autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the accumulated micro-batches (tokens, labels[, position_ids]) as the loader gives
    them; returns (mean loss on this rank, grad norm)."""
    micro_batches = [model.local_batch(batch) for batch in micro_batches]  # context parallelism: this rank's part
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # pretrain.optim's per-group factor (RWKV-7's w₀: 2×)
    if model.schedule is not None:  # pipeline: the schedule runs every micro-batch's forward and backward
        with autocast:
            total = model.pipeline_step(micro_batches)
    else:
        module = model.parts[0]
        total = torch.zeros((), device=micro_batches[0][0].device)
        for i, batch in enumerate(micro_batches):
            set_gradient_sync(module, last_micro_step=i == len(micro_batches) - 1)  # how dp reduces this one
            tokens, inputs = model_inputs(batch)
            with autocast:
                loss = module(tokens, **inputs) / len(micro_batches)
            loss.backward()
            total += loss.detach()
    grad_norm = model.clip_grad_norm_(grad_clip)  # over every shard and pipeline stage; 0 = only measure
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


@torch.no_grad()
def evaluate(model: ParallelModel, batches, autocast) -> float:
    for part in model.parts:
        part.eval()
    batches = [model.local_batch(batch) for batch in batches]  # context parallelism: this rank's part
    with autocast:
        if model.schedule is not None:
            loss = model.pipeline_eval(batches)
        else:
            loss = torch.stack([at_least_fp32(model.parts[0](tokens, **inputs))
                                for tokens, inputs in map(model_inputs, batches)]).mean()
    for part in model.parts:
        part.train()
    return mean_across_ranks(loss)


class Throughput:
    """Tokens/s, TFLOP/s and MFU per device over the steps since the last restart, by the host's clock: read on a
    logged step after its loss has come to the host, so the window's device work is done; restarted after the step's
    validation, so evaluation time counts in no window."""

    def __init__(self, cfg: Config, *, world_size: int, device: torch.device):
        self.seq_len, self.world_size = cfg.model.seq_len, world_size
        self.tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
        self.document_mask = cfg.data.document_mask
        self.flops = flops_per_token(cfg.model)
        # Under document masking, also the FLOPs a document-masked kernel does: attention over each document's
        # square. The count is linear in the span, so two counts (full span, none) give it for any batch.
        self.flops_no_attention = flops_per_token(cfg.model, attention_span=0.0)
        self.peak = peak_flops(device)
        self.start, self.steps, self.span = time.monotonic(), 0, 0.0

    def add_step(self, *, attention_span: float = 0.0) -> None:
        self.steps += 1
        self.span += attention_span

    def read(self) -> dict:
        tokens_per_s = self.steps * self.tokens_per_step / (time.monotonic() - self.start)
        achieved = tokens_per_s * self.flops / self.world_size  # FLOP/s per device
        metrics = {"tokens_per_s": tokens_per_s, "tflops_per_gpu": achieved / 1e12,
                   "mfu": achieved / self.peak if self.peak else None}
        if self.document_mask:
            span = self.span / self.steps
            in_documents = self.flops_no_attention + (self.flops - self.flops_no_attention) * span / self.seq_len
            achieved = tokens_per_s * in_documents / self.world_size
            metrics.update(attention_span=span, tflops_per_gpu_documents=achieved / 1e12,
                           mfu_documents=achieved / self.peak if self.peak else None)
        return metrics

    def restart(self) -> None:
        self.start, self.steps, self.span = time.monotonic(), 0, 0.0


class NonFiniteWatch:
    """The first step whose gradient norm was not finite, remembered on the device so that no step waits for the
    host to look; `check` reads it where the host syncs anyway (logged steps) and before every checkpoint save."""

    def __init__(self, device: torch.device, *, checkpoints: Path, last_saved: int | None):
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # 0: every step so far was finite
        self.checkpoints, self.last_saved = checkpoints, last_saved

    def update(self, step: int, grad_norm: torch.Tensor) -> None:
        # The norm is reduced over every rank, so all ranks record the same step and stop together in `check`.
        self.first_bad.masked_fill_(~torch.isfinite(grad_norm) & (self.first_bad == 0), step)

    def check(self, step: int) -> None:
        bad = int(self.first_bad.item())
        if bad:
            last = f" (step {self.last_saved})" if self.last_saved is not None else ""
            raise FloatingPointError(
                f"non-finite loss/gradient at step {bad}, found at step {step} (checked on logged steps and before "
                f"saves); nothing after the last good checkpoint{last} was saved. Resuming restarts from the newest "
                f"complete checkpoint in {self.checkpoints}: lower optim.lr, raise optim.warmup_steps or check the "
                f"data.")


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA device is visible; use train.device=auto.")
        return torch.device("cuda", local_rank % torch.cuda.device_count())  # srun --gpus-per-task=1: one device
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_parallel_model(cfg: Config, mesh, *, device: torch.device,
                         param_dtype: torch.dtype | None) -> ParallelModel:
    """This process's share of the model, laid out over `mesh` (None: one process) with the seed's initial weights."""
    # Built on the meta device (no memory) and laid out there; then each process allocates only its shards and
    # initialises them to what one process initialising the whole model from this seed would hold.
    seed_everything(cfg.train.seed)
    with torch.device("meta"):
        model = build_model(cfg.model)
    return parallelize(model, cfg, mesh, device=device, param_dtype=param_dtype)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank in GiB: tensors allocated on the GPU since the model was laid out, or the
    process's resident set on CPU (since it started: the interpreter, libraries and the full model built first)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build_loaders(cfg: Config, *, dp_rank: int, dp_size: int):
    """This rank's training loader and validation loader (None without evaluation), checked against the model."""
    d, seq_len, micro = cfg.data, cfg.model.seq_len, cfg.train.micro_batch
    if d.path == SYNTHETIC:
        return SyntheticLoader(cfg.model.vocab_size, seq_len=seq_len, micro_batch=micro, dp_rank=dp_rank,
                               dp_size=dp_size, seed=cfg.train.seed), None
    manifests = open_manifests(d.path, d.blend)  # read once: the checks and both loaders share them
    check_vocab(manifests, cfg.model.vocab_size)
    check_tokenizer(manifests, d.tokenizer)
    loader = Loader(d.path, "train", seq_len=seq_len, micro_batch=micro, dp_rank=dp_rank, dp_size=dp_size,
                    seed=cfg.train.seed, blend=d.blend, num_workers=d.num_workers, on_error=d.on_error,
                    shuffle_window=d.shuffle_window, return_doc_boundaries=d.document_mask,
                    vocab_size=cfg.model.vocab_size, manifests=manifests)
    val_loader = (ValLoader(d.val_path or d.path, "val", seq_len=seq_len, micro_batch=micro, dp_rank=dp_rank,
                            dp_size=dp_size, blend="" if d.val_path else d.blend, on_error=d.on_error,
                            return_doc_boundaries=d.document_mask, vocab_size=cfg.model.vocab_size,
                            manifests=None if d.val_path else manifests)
                  if cfg.train.eval_interval else None)
    return loader, val_loader


def train(cfg: Config) -> list[float]:
    """Run (or resume) the configured training; returns the losses it logged (mean over ranks)."""
    with contextlib.ExitStack() as on_exit:  # the run_dir lock and the checkpoint writer, let go also on errors
        return _train(cfg, on_exit)


def _train(cfg: Config, on_exit: contextlib.ExitStack) -> list[float]:
    t_start = time.monotonic()
    device = pick_device(cfg.train.device, 0)
    env = init_distributed(device.type, timeout_minutes=cfg.train.collective_timeout_minutes,
                           run_dir=cfg.train.run_dir)
    # Before any work: a second live run in this run_dir is refused on every rank (see RunLock).
    on_exit.enter_context(RunLock.acquire(cfg.train.run_dir))
    device = pick_device(cfg.train.device, env.local_rank)
    dims = ParallelDims.from_config(cfg, env.world_size)
    mesh = dims.build_mesh(device.type) if env.world_size > 1 else None
    dp_rank = mesh.get_local_rank("dp") if mesh is not None else 0  # ranks of one model replica share data
    is_main = env.rank == 0
    if is_main and (warning := kernel_warning(cfg.model, device.type)):
        log.warning("%s", warning)
    run_dir = Path(cfg.train.run_dir)
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext())

    # Data first: a data/tokenizer mismatch should fail before any model memory is allocated.
    loader, val_loader = build_loaders(cfg, dp_rank=dp_rank, dp_size=dims.dp)
    seq_len = cfg.model.seq_len
    grad_accum = cfg.train.micro_batches_per_step(dims.dp)

    model = build_parallel_model(cfg, mesh, device=device, param_dtype=torch.bfloat16 if use_bf16 else None)
    optimizers = [build_optimizer(part, cfg.optim, device) for part in model.parts]
    if device.type == "cuda":  # the peak memory logged is the training loop's, not the full model built first
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    ckpt = on_exit.enter_context(Checkpointer(cfg.checkpoint, run_dir, run_config=cfg.to_dict()))
    resumed = ckpt.load(model=model.parts, optimizer=optimizers)
    step, tokens_seen = 0, 0
    if resumed:
        step = resumed["step"]
        loader.load_state_dict(resumed["state"]["data"])
        tokens_seen = resumed["state"]["tokens_seen"]
    # Stop signals (preemption, time limit) and the wall-time budget; per-rank step times; stall reports.
    job = JobControl(cfg, env, device=device, started=t_start, step=step)
    on_exit.callback(job.monitor.close)  # on an error too: the stall watchdog must not outlive the run

    logger = MetricsLogger(run_dir, enabled=is_main, start_step=step, total_steps=cfg.train.steps,
                           tensorboard=cfg.log.tensorboard, progress=cfg.log.progress)
    on_exit.callback(logger.close)  # flushed also when training stops with an error
    tokens_per_step = cfg.train.global_batch * seq_len
    throughput = Throughput(cfg, world_size=env.world_size, device=device)
    non_finite = NonFiniteWatch(device, checkpoints=run_dir / "checkpoints", last_saved=step if resumed else None)
    losses, steps_this_run = [], 0
    for part in model.parts:
        part.train()
    while step < cfg.train.steps:
        step += 1
        # dropout's stream for this step: one per replica and stage, shared by its tp ranks (parallel/random.py)
        seed_streams(cfg.train.seed, mesh, step=step, device=device)
        micro_batches = [next(loader) for _ in range(grad_accum)]
        # from the position ids still on the host: no device sync
        span = sum(attention_span(b[2]) for b in micro_batches) / grad_accum if cfg.data.document_mask else 0.0
        micro_batches = [tuple(t.to(device, non_blocking=True) for t in batch) for batch in micro_batches]
        with job.timed(step):
            loss, grad_norm = train_step(model, optimizers, micro_batches, lr=lr_at(step, cfg.optim, cfg.train.steps),
                                         grad_clip=cfg.optim.grad_clip, autocast=autocast)
        non_finite.update(step, grad_norm)  # on the device; read where the host syncs anyway, and before any save
        tokens_seen += tokens_per_step
        steps_this_run += 1
        throughput.add_step(attention_span=span)

        evaluating = cfg.train.eval_interval > 0 and (step % cfg.train.eval_interval == 0 or step == cfg.train.steps)
        logged = step % cfg.log.interval == 0 or step == cfg.train.steps or evaluating
        if logged:  # host reads and collectives beyond the step's own: on logged steps only
            non_finite.check(step)
            losses.append(mean_across_ranks(loss))
            metrics = {"loss": losses[-1], "lr": lr_at(step, cfg.optim, cfg.train.steps),
                       "grad_norm": grad_norm.item(), **throughput.read(), "tokens_seen": tokens_seen,
                       "epoch": loader.epoch, "skipped_shards": len(loader.skipped_shards),
                       "memory_gb": peak_memory_gb(device)}
            if evaluating:
                batches = [tuple(t.to(device) for t in b) for b in val_loader.batches(cfg.train.eval_batches)]
                val_loss = evaluate(model, batches, autocast)
                metrics.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            logger.log(step, metrics)
            throughput.restart()

        exiting = 0 < cfg.train.exit_after_steps <= steps_this_run
        exiting |= job.should_stop(step, logged=logged)  # collective on logged and every train.sync_every steps
        if ckpt.due(step) or exiting or (step == cfg.train.steps and cfg.checkpoint.save_at_end):
            non_finite.check(step)  # never a checkpoint of weights that a non-finite step has touched
            ckpt.save(step, model=model.parts, optimizer=optimizers,
                      state={"data": loader.state_dict(), "tokens_seen": tokens_seen})
            non_finite.last_saved = step
        if exiting and step < cfg.train.steps:
            if is_main:
                print(f"stopped after step {step} with a checkpoint; the same command resumes", flush=True)
            break
    ckpt.close()  # the last (asynchronous) checkpoint is published before a requeue may end this job
    logger.close()
    job.close(finished=step >= cfg.train.steps)  # under SLURM, requeues a job stopped early by a signal/budget
    return losses


def error_kind(error: Exception) -> str | None:
    """'config', 'checkpoint', 'data' or 'training' for an error whose message says what to do; None for an
    unexpected one, whose traceback is the report."""
    if isinstance(error, ConfigError):  # also the layout checks of parallel.mesh
        return "config"
    if isinstance(error, (CheckpointError, UnsafeCheckpointError)):
        return "checkpoint"
    if isinstance(error, FloatingPointError):  # the non-finite loss check of the training loop
        return "training"
    # data/ raises plain ValueError / FileNotFoundError written for users; the same types coming out of a library
    # call there (numpy, from C) are bugs, so only a `raise` statement in data/ counts.
    innermost = error.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    if isinstance(error, (ValueError, OSError)) and innermost is not None:
        frame = innermost.tb_frame
        source = linecache.getline(frame.f_code.co_filename, innermost.tb_lineno)
        if frame.f_globals.get("__name__", "").startswith("data.") and source.lstrip().startswith("raise"):
            return "data"
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m pretrain.train ARGS`; returns the exit status. A known error (see error_kind) is printed as one
    line for the whole job and returns 1; any other error propagates with its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    finished = False
    try:
        cfg = load_config(argv)
        with stop_on_signals():  # SIGUSR2/SIGTERM: save at the next step boundary and exit (see launch.preemption)
            train(cfg)
        finished = True
    except Exception as e:
        kind = error_kind(e)
        if kind is None:
            raise
        report_error(kind, str(e))  # one line for the job, before any rank exits
        return 1
    finally:
        shutdown(finished=finished)  # after an error, no barrier: other ranks may be inside a collective
    return 0


if __name__ == "__main__":
    end_process(main())  # without the interpreter's teardown, which can abort a distributed run (see end_process)
