"""The GPU suite: one prepared command that turns a borrowed GPU into the numbers we publish.

    python bench/gpu_suite.py [--out DIR] [--minutes 8] [--smoke] [--parts kernels,throughput,...] [--device auto]
    bench/gpu_suite.sh OUT_ROOT          # where there is no package index: installs .whl/ (make gpu-wheels) first

Parts, most important first. Every measured row goes into <out>/results.json at once (the file is rewritten
atomically), and report.md with its PNG plots is rewritten after every part, so a run cut short keeps all it measured.

1. kernels     fla's chunk_gla, chunk_rwkv7, parallel_forgetting_attn and FlexAttention (FoX score_mod), called
               through pretrain.ops as training calls them, and our torch path: forward and backward milliseconds, and
               the max error of the output and of every input gradient against a float64 run of our torch path on the
               same inputs (drawn bf16-representable, so bf16 and fp32 runs see identical values).
2. throughput  our four architectures at ~350M (configs/), seq 2048 and 8192, parallel.compile off / on, on the
               training code path (pretrain.train's build_parallel_model and train_step, pretrain.optim), bf16
               autocast: tokens/s, TFLOP/s and MFU (pretrain.metrics FLOPs), peak memory of the timed steps.
3. peers       HF LlamaForCausalLM (SDPA), fla's GLAForCausalLM and RWKV7ForCausalLM at the same shapes and batch in a
               plain loop with the same precision recipe (fp32 weights, bf16 autocast, fused AdamW, gradient clipping),
               eager and compiled; the ratio ours / theirs.
4. longest     the longest trainable sequence (batch 1) per memory mode (recompute none / selective / full, MsT off /
               on) for the Transformer and GLA: two probes fit peak memory against length, the fit predicts the
               longest, trials bisect towards it within the part's time bound. First, saved activation bytes per layer
               at one length against Korthikanti et al.'s formulas (gpt preset) and launch.perfmodel (Transformer, GLA).
5. memory      peak memory in forward, backward and the optimizer step for the ~350M Transformer and GLA, beside
               launch.perfmodel's prediction for the same run.
6. checkpoint  how long training is blocked by a synchronous and an asynchronous save: bench/checkpoint.py, run as a
               subprocess where it exists and takes the options this part passes.
7. hybrid      the 3:1 hybrids at ~350M (configs/hybrid-gla-340m.toml, hybrid-rwkv7-340m.toml) next to their pure
               parents (GLA, RWKV-7, the Transformer) at 8k and 32k tokens, as the throughput part trains them:
               tokens/s and peak memory, and each hybrid's ratio to each parent.
8. ceiling     the single-device context ceiling that context parallelism (parallel.cp) goes beyond: the four
               architectures at ~350M with 32k and 64k tokens per sequence, batch 1, parallel.cp = 1 and full
               recomputation, as the throughput part trains them (a few steps): tokens/s, MFU and peak memory.

Time: --minutes bounds the run. Each part gets the time left times its share of the shares still to come; a part or a
point whose estimated time exceeds what it has left is recorded as skipped with the estimate, and a watchdog (SIGALRM)
stops a part that runs past its time, keeping its rows. Timed windows are bounded by CUDA events; nothing else
synchronizes. --smoke runs every part with tiny sizes (on CPU: fla's kernels and models, compilation and
FlexAttention's backward are recorded as skipped, with the reason).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.memory import PeakMemory, formula_bytes, saved_bytes  # noqa: E402
from bench.ops import make_inputs  # noqa: E402
from launch.perfmodel import Cluster, Layout, activation_bytes_per_layer, memory_breakdown  # noqa: E402
from pretrain.config import Config, ModelConfig, build_config, layer_mixers, read_toml  # noqa: E402
from pretrain.metrics import flops_per_token, peak_flops  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.models.common import mlp_hidden_size  # noqa: E402
from pretrain.models.rwkv7 import lora_rank  # noqa: E402
from pretrain.ops import forgetting_attention, gla, rwkv7  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402
from pretrain.train import build_parallel_model, train_step  # noqa: E402

ARCHS = ("transformer", "fox", "gla", "rwkv7")
GIB = 2**30


# ------------------------------------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class Sizes:
    """What the parts measure: FULL on a GPU; SMOKE, tiny, checks the suite itself (on CPU in about a minute)."""

    models: dict
    """arch → (config file, model overrides): the model every part builds for that architecture."""
    kernel_shapes: tuple
    """(T, D) pairs of the kernel part, in the order measured."""
    kernel_heads: int
    kernel_batch: int
    kernel_repeats: int
    """Timed calls per kernel point (median reported), after one warm-up call."""
    seqs: tuple
    """Sequence lengths of the throughput and peer parts."""
    tokens_per_step: int
    """Tokens per optimizer step (one micro-batch): batch = tokens_per_step // seq."""
    warmup_steps: int
    timed_steps: int
    longest_archs: tuple
    probe_lens: tuple
    """Three lengths the longest-sequence search first trains: their peaks and times predict longer ones."""
    granularity: int
    """Trial lengths are multiples of this."""
    memory_modes: tuple
    """(recompute, MsT chunks) of the longest-sequence searches, in the order measured."""
    series_seconds: float | None
    """Time bound of one longest-sequence search; None = an even share of the part's time left."""
    capacity_bytes: int | None
    """Memory a longest-sequence trial may use; None = the device's own (real out-of-memory errors)."""
    korthikanti: dict
    """seq, d_model, heads of the activation-bytes check."""
    memory_seq: int
    """Sequence length of the memory-by-phase part (batch from tokens_per_step)."""
    prior_scale: float
    """Multiplies the prior time estimates of points nothing comparable has been measured for yet."""
    hybrid_seqs: tuple
    """Sequence lengths of the hybrid part."""
    ceiling_seqs: tuple = (32768, 65536)
    """Sequence lengths of the single-device context ceiling part (batch 1, full recomputation)."""
    ceiling_steps: tuple = (1, 3)
    """(warm-up, timed) steps per ceiling point: a 64k step of a ~350M model takes seconds."""


# The shipped ~350M configs. There is no ~350M Transformer config: it takes GLA-340M's body (1024 wide, 24 layers,
# SwiGLU 2816, vocab 32000, RMSNorm eps 1e-6) with Llama's heads of 64, RoPE and untied embeddings (~370M parameters).
FULL = Sizes(
    models={"transformer": ("configs/gla-340m.toml", {"arch": "transformer", "n_heads": 16, "pos": "rope",
                                                       "tie_embeddings": False, "init_std": 0.02}),
            "fox": ("configs/fox-360m.toml", {}), "gla": ("configs/gla-340m.toml", {}),
            "rwkv7": ("configs/rwkv7-340m.toml", {}), "hybrid-gla": ("configs/hybrid-gla-340m.toml", {}),
            "hybrid-rwkv7": ("configs/hybrid-rwkv7-340m.toml", {})},
    kernel_shapes=((2048, 64), (8192, 64), (2048, 128), (8192, 128)), kernel_heads=8, kernel_batch=2,
    kernel_repeats=5, seqs=(2048, 8192), tokens_per_step=16384, warmup_steps=3, timed_steps=20,
    longest_archs=("transformer", "gla"), probe_lens=(4096, 8192, 16384), granularity=1024,
    memory_modes=(("none", 1), ("selective", 1), ("full", 1), ("none", 8), ("selective", 8), ("full", 8)),
    series_seconds=None, capacity_bytes=None, korthikanti={"seq": 2048, "d_model": 1024, "heads": 16},
    memory_seq=2048, prior_scale=1.0, hybrid_seqs=(8192, 32768))

SMOKE = Sizes(
    models={arch: (f"configs/{arch}-tiny.toml", {}) for arch in (*ARCHS, "hybrid-gla", "hybrid-rwkv7")},
    kernel_shapes=((64, 16),), kernel_heads=2, kernel_batch=1, kernel_repeats=2, seqs=(64, 128),
    tokens_per_step=256, warmup_steps=1, timed_steps=2, longest_archs=("transformer", "gla"),
    probe_lens=(64, 128, 256), granularity=32, memory_modes=(("none", 1), ("full", 4)), series_seconds=15.0,
    capacity_bytes=32 * 2**20, korthikanti={"seq": 128, "d_model": 64, "heads": 4}, memory_seq=128,
    prior_scale=0.05, hybrid_seqs=(64,), ceiling_seqs=(128,), ceiling_steps=(1, 2))

# Share of the remaining time each part gets (of the parts still to come), and the least it needs to start.
PART_SHARES = {"kernels": 0.22, "throughput": 0.30, "peers": 0.18, "longest": 0.12, "memory": 0.06, "checkpoint": 0.12,
               "hybrid": 0.12, "ceiling": 0.12}
PART_MIN_SECONDS = {"kernels": 20, "throughput": 30, "peers": 20, "longest": 20, "memory": 10, "checkpoint": 20,
                    "hybrid": 30, "ceiling": 30}
# Prior time estimates of points (GPU seconds), replaced by what the run measures for the same kind of point.
POINT_PRIORS = {"kernel fla": 20, "kernel flex": 40, "kernel torch": 5, "ours eager": 15, "ours compiled": 60,
                "peer eager": 15, "peer compiled": 60, "activations": 5, "longest": 15, "memory": 10, "checkpoint": 60,
                "ceiling": 40}
REPORT_RESERVE_S = 15  # kept back from the parts for the final report
WATCHDOG_GRACE = 1.1  # the watchdog stops a part at 110% of its time: points already try to stay within it


# ------------------------------------------------------------------------------------------- time and results

class PartTimeout(BaseException):
    """A part ran past its time. A BaseException, so that a point's `except Exception` does not swallow it."""


class Skip(Exception):
    """A point that cannot run here, with the reason."""


@contextlib.contextmanager
def watchdog(seconds: float):
    """Raise PartTimeout in the main thread once `seconds` have passed (SIGALRM; checked between bytecodes, so a
    long CUDA call finishes first)."""
    def fire(signum, frame):
        raise PartTimeout(f"past its {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def finite_or_none(value):
    """JSON-safe numbers: NaN and infinities become null (the row's `finite` flag says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class Results:
    """results.json: the run's metadata and each part's status, seconds and rows; rewritten atomically on every
    change."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "parts": {}}
        self.save()

    def part(self, name: str) -> dict:
        return self.data["parts"].setdefault(name, {"status": "not run", "rows": []})

    def add_row(self, part: str, row: dict) -> None:
        self.part(part)["rows"].append(row)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(finite_or_none(self.data), indent=1))
        os.replace(tmp, self.path)


@dataclass
class Suite:
    """One run: sizes, device, output and time."""

    sizes: Sizes
    device: torch.device
    out: Path
    results: Results
    deadline: float
    """time.monotonic() by which every part has finished."""
    measured: dict = field(default_factory=dict)
    """Seconds the last point of each kind took: the estimate for the next one."""

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        # as train.py with train.dtype=auto: bf16 autocast on GPUs, fp32 on CPU
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()


class Part:
    """One part's run: its deadline, and each point's time check and row."""

    def __init__(self, suite: Suite, name: str, deadline: float):
        self.suite, self.name, self.deadline = suite, name, deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def estimate(self, kind: str) -> float:
        """The last time of this kind of point, else of its family (the part of `kind` before ':'), else a prior."""
        family = kind.split(":")[0]
        prior = POINT_PRIORS[family] * self.suite.sizes.prior_scale
        return self.suite.measured.get(kind, self.suite.measured.get(family, prior))

    def point(self, kind: str, row: dict, measure) -> dict:
        """Measure one point into `row` (`measure()` returns its fields) and add it to the results: skipped when its
        estimated time exceeds the part's time left, and out-of-memory or other errors recorded with their reason.
        `kind` ("kind" or "kind:detail") names what the time estimate is learned from."""
        label = " ".join(f"{v}" for v in row.values())
        estimate = self.estimate(kind)
        if estimate > self.left():
            row.update(status="skipped", reason=f"would overrun: estimated {estimate:.0f} s, "
                                                 f"{max(self.left(), 0):.0f} s left for this part")
            return self._add(row, label)
        start = time.monotonic()
        try:
            row.update(measure())
            row.setdefault("status", "ok")
            self.suite.measured[kind] = self.suite.measured[kind.split(":")[0]] = time.monotonic() - start
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except torch.OutOfMemoryError as e:
            row.update(status="oom", reason=str(e).splitlines()[0][:300])
        except PartTimeout:
            row.update(status="cut", reason="the part's time ran out during this point")
            self._add(row, label, start)
            raise
        except Exception as e:  # one point failing must not stop the others
            traceback.print_exc()
            first_line = (str(e).strip().splitlines() or [""])[0]
            row.update(status="error", reason=f"{type(e).__name__}: {first_line[:300]}")
        return self._add(row, label, start)

    def _add(self, row: dict, label: str, start: float | None = None) -> dict:
        if start is not None:
            row["seconds"] = round(time.monotonic() - start, 2)
            free_memory(self.suite.device)
        self.suite.results.add_row(self.name, row)
        detail = f" ({row['reason']})" if row.get("reason") else ""
        print(f"[{self.name}] {label}: {row['status']}{detail} {row.get('seconds', 0):.1f} s", flush=True)
        return row


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ clocks and memory

class Stopwatch:
    """Seconds of the work queued between start() and stop(): CUDA events on a GPU (the one synchronize is at the
    end of the window), the wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # the window starts with nothing of earlier work in flight
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.t0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.begin.elapsed_time(end) / 1e3


def median_seconds(fn, *, device: torch.device, repeats: int) -> float:
    """Median time of `repeats` calls of fn, each its own window, after one untimed call."""
    fn()
    watch, times = Stopwatch(device), []
    for _ in range(repeats):
        watch.start()
        fn()
        times.append(watch.stop())
    return statistics.median(times)


class MemoryMeter:
    """Bytes allocated now and at most since `mark()`. On a GPU, the caching allocator's counters. On CPU, the live
    storages (bench.memory.PeakMemory) of the tensors `resident` at entry (weights, optimizer states) and of every
    tensor made since."""

    def __init__(self, device: torch.device, resident=()):
        self.cuda = device.type == "cuda"
        self.resident = list(resident)
        self.mode = None

    def __enter__(self):
        if not self.cuda:
            self.mode = PeakMemory().__enter__()
            # a view registers its whole storage, once: the resident tensors are then counted from the start, and
            # their in-place updates (the optimizer step) are not counted as new memory
            for t in self.resident:
                t.detach()
        self.mark()
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)

    def mark(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.mode is not None:
            self.mode.peak = self.mode.live

    def now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return self.mode.live

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self.mode.peak


def optimizer_tensors(optimizers) -> list[torch.Tensor]:
    return [v for o in optimizers for state in o.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


# ---------------------------------------------------------------------------------------- our training path

def run_config(suite: Suite, arch: str, *, seq: int, batch: int, parallel: dict | None = None,
               model: dict | None = None) -> Config:
    """The run's Config: the architecture's config file, our overrides, synthetic data, one micro-batch per step."""
    path, overrides = suite.sizes.models[arch]
    cli = {"model": {**overrides, "seq_len": seq, **(model or {})}, "parallel": parallel or {},
           "data": {"path": "synthetic"}, "train": {"micro_batch": batch, "global_batch": batch, "eval_interval": 0}}
    return build_config(read_toml(REPO / path), cli, file_name=path)


def build_ours(cfg: Config, device: torch.device):
    """Model and optimizers as pretrain/train.py makes them on one process."""
    model = build_parallel_model(cfg, None, device=device,
                                 param_dtype=torch.bfloat16 if device.type == "cuda" else None)
    return model, [build_optimizer(part, cfg.optim, device) for part in model.parts]


def random_batch(vocab: int, batch: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)  # (B, T + 1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # inputs, next-token labels: (B, T) each


def count_params(model_cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(model_cfg).parameters())


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (torch.compiler.reset() does not zero the count)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def time_training(suite: Suite, step, *, flops: float, batch: int, seq: int) -> dict:
    """Warm-up steps (compilation happens there), then the timed window; tokens/s, TFLOP/s, MFU, peak memory."""
    s = suite.sizes
    start = time.perf_counter()
    for _ in range(s.warmup_steps):
        step()
    if suite.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - start
    watch = Stopwatch(suite.device)
    watch.start()
    for _ in range(s.timed_steps):
        loss = step()
    seconds = watch.stop()
    tokens_per_s = s.timed_steps * batch * seq / seconds
    peak = peak_flops(suite.device)
    return {"tokens_per_s": round(tokens_per_s, 1), "step_ms": round(1e3 * seconds / s.timed_steps, 2),
            "tflops": round(tokens_per_s * flops / 1e12, 3),
            "mfu": round(tokens_per_s * flops / peak, 4) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if suite.cuda else None,
            "warmup_s": round(warmup_s, 2), "loss": float(loss), "finite": math.isfinite(float(loss)),
            "flops_per_token": flops}


def mixer_kernel(arch: str, device: torch.device) -> str:
    """What model.attn_impl=auto runs for `arch` on `device` (pretrain.ops's dispatch rule)."""
    if arch == "transformer":
        return "SDPA"
    if device.type == "cuda" and importlib.util.find_spec("fla") is not None:
        return {"fox": "fla parallel_forgetting_attn", "gla": "fla chunk_gla", "rwkv7": "fla chunk_rwkv7"}[arch]
    return "torch (ours)"


# ---------------------------------------------------------------------------------------------- 1. kernels

OPS = {"gla": gla, "rwkv7": rwkv7, "fox": forgetting_attention}
OP_INPUTS = {"gla": ("q", "k", "v", "g"), "rwkv7": ("r", "w", "k", "v", "a", "b"), "fox": ("q", "k", "v", "log_f")}
# op → the fast paths measured against our torch path: (impl, what runs)
FAST_PATHS = {"gla": (("fla", "fla chunk_gla"),), "rwkv7": (("fla", "fla chunk_rwkv7"),),
              "fox": (("fla", "fla parallel_forgetting_attn"), ("flex", "FlexAttention, forget-gate score_mod"))}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Reference:
    """A float64 run of our torch path: inputs (bf16-representable values), upstream gradient, output, gradients."""

    inputs: list
    grad_out: torch.Tensor
    out: torch.Tensor
    grads: tuple


def kernel_reference(suite: Suite, op: str, T: int, D: int) -> Reference:
    s = suite.sizes
    seed = 1000 * T + 10 * D + list(OPS).index(op)  # fresh inputs for every shape, the same in every run
    inputs = [x.detach().to(torch.bfloat16).to(suite.device, torch.float64).requires_grad_()
              for x in make_inputs(op, s.kernel_batch, T, s.kernel_heads, D, seed=seed)]
    gen = torch.Generator().manual_seed(seed + 1)
    out = OPS[op](*inputs, impl="torch")
    grad_out = torch.randn(out.shape, generator=gen).to(torch.bfloat16).to(suite.device, torch.float64)
    return Reference(inputs, grad_out, out.detach(), torch.autograd.grad(out, inputs, grad_out))


def error(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max absolute error, the same over the reference's max magnitude, and the norm of the error over the norm."""
    diff = (x.detach().double() - ref).abs()
    scale = ref.abs().max().item()
    max_abs = diff.max().item()
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale else None,
            "norm_rel": (diff.norm() / ref.norm()).item() if scale else None,
            "finite": bool(torch.isfinite(x).all())}


def kernel_point(suite: Suite, refs: dict, *, op: str, impl: str, dtype: str, T: int, D: int) -> dict:
    if impl == "fla" and not suite.cuda:
        raise Skip("fla's Triton kernels need CUDA")
    if impl == "fla" and importlib.util.find_spec("fla") is None:
        raise Skip("fla (fla-core) is not installed")
    backward = suite.cuda or impl != "flex"
    if (op, T, D) not in refs:
        refs.clear()  # one shape's reference at a time: they are large at full size
        refs[(op, T, D)] = kernel_reference(suite, op, T, D)
    ref = refs[(op, T, D)]
    xs = [x.detach().to(DTYPES[dtype]).requires_grad_(backward) for x in ref.inputs]
    grad_out = ref.grad_out.to(DTYPES[dtype])

    def forward():
        return OPS[op](*xs, impl=impl)

    def forward_backward():
        return torch.autograd.grad(forward(), xs, grad_out)

    if impl == "flex":
        torch.compiler.reset()  # a compile per shape and dtype: dynamo's recompile limit would fall back to eager
    start = time.perf_counter()
    out = forward()
    grads = torch.autograd.grad(out, xs, grad_out) if backward else ()
    if suite.cuda:
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start  # includes Triton autotuning / compilation
    errors = {"o": error(out, ref.out)}
    errors.update({f"d{name}": error(g, r) for name, g, r in zip(OP_INPUTS[op], grads, ref.grads)})
    del out, grads
    fwd = median_seconds(forward, device=suite.device, repeats=suite.sizes.kernel_repeats)
    row = {"fwd_ms": round(1e3 * fwd, 3), "first_call_s": round(first_call_s, 2), "errors": errors,
           "max_rel_err": max(e["max_rel"] or 0.0 for e in errors.values()),
           "finite": all(e["finite"] for e in errors.values())}
    if backward:
        both = median_seconds(forward_backward, device=suite.device, repeats=suite.sizes.kernel_repeats)
        row.update(fwd_bwd_ms=round(1e3 * both, 3), bwd_ms=round(1e3 * (both - fwd), 3))
    else:
        row["backward"] = "not run: FlexAttention has no backward on CPU"
    return row


def run_kernels(suite: Suite, part: Part) -> None:
    s, refs = suite.sizes, {}
    for T, D in s.kernel_shapes:
        for op in OPS:
            for impl, what in (*FAST_PATHS[op], ("torch", "ours: chunkwise / blockwise torch")):
                for dtype in DTYPES:
                    row = {"op": op, "impl": impl, "T": T, "D": D, "dtype": dtype, "kernel": what,
                           "H": s.kernel_heads, "B": s.kernel_batch}
                    kind = f"kernel {impl}:{op}-{dtype}-{T}x{D}"
                    part.point(kind, row, lambda: kernel_point(suite, refs, op=op, impl=impl, dtype=dtype, T=T, D=D))
    refs.clear()


# ------------------------------------------------------------------------------------------- 2. throughput

def measure_ours(suite: Suite, arch: str, *, seq: int, compiled: bool) -> dict:
    if compiled and not suite.cuda:
        raise Skip("parallel.compile compiles blocks on CUDA only")
    batch = max(1, suite.sizes.tokens_per_step // seq)
    cfg = run_config(suite, arch, seq=seq, batch=batch, parallel={"compile": compiled})
    torch.compiler.reset()
    model, optimizers = build_ours(cfg, suite.device)
    tokens, labels = random_batch(cfg.model.vocab_size, batch, seq, suite.device)
    autocast = suite.autocast()

    def step():
        loss, _ = train_step(model, optimizers, [(tokens, labels)], lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip,
                             autocast=autocast)
        return loss

    row = {"batch": batch, "params": sum(p.numel() for p in model.parameters()),
           "kernel": " + ".join(mixer_kernel(mixer, suite.device) for mixer in dict.fromkeys(layer_mixers(cfg.model)))}
    graphs = compiled_graphs()
    row.update(time_training(suite, step, flops=flops_per_token(cfg.model), batch=batch, seq=seq))
    if compiled:
        row["compiled_graphs"] = compiled_graphs() - graphs
        if not row["compiled_graphs"]:
            row.update(status="error", reason="parallel.compile=true but torch.compile made no graph")
    return row


def run_throughput(suite: Suite, part: Part) -> None:
    for compiled in (False, True):  # every eager point first: they are what the peers are compared with
        for seq in suite.sizes.seqs:
            for arch in ARCHS:
                row = {"arch": arch, "seq": seq, "compile": compiled}
                part.point(f"ours {'compiled' if compiled else 'eager'}:{arch}-{seq}", row,
                           lambda: measure_ours(suite, arch, seq=seq, compiled=compiled))
    torch.compiler.reset()


# ------------------------------------------------------------------------------------------------ 7. hybrid

# each 3:1 hybrid (a Sizes.models key) → its pure parents
HYBRIDS = {"hybrid-gla": ("gla", "transformer"), "hybrid-rwkv7": ("rwkv7", "transformer")}


def hybrid_ratios(rows: list[dict]) -> list[dict]:
    """Each hybrid's tokens/s and peak memory over each parent's, at every length both were measured."""
    ok = {(r["arch"], r["seq"]): r for r in _ok(rows)}
    out = []
    for (name, seq), hybrid in ok.items():
        for parent in HYBRIDS.get(name, ()):
            if (parent, seq) not in ok:
                continue
            pure = ok[parent, seq]
            memory = (round(hybrid["peak_memory_gib"] / pure["peak_memory_gib"], 3)
                      if hybrid["peak_memory_gib"] and pure["peak_memory_gib"] else None)
            out.append({"hybrid": name, "parent": parent, "seq": seq,
                        "tokens_per_s_ratio": round(hybrid["tokens_per_s"] / pure["tokens_per_s"], 3),
                        "peak_memory_ratio": memory})
    return out


def run_hybrid(suite: Suite, part: Part) -> None:
    entry = suite.results.part("hybrid")
    names = dict.fromkeys(name for hybrid, parents in HYBRIDS.items() for name in (hybrid, *parents))
    for seq in suite.sizes.hybrid_seqs:
        for name in names:
            row = {"arch": name, "seq": seq, "compile": False}
            part.point(f"ours eager:{name}-{seq}", row, lambda: measure_ours(suite, name, seq=seq, compiled=False))
            entry["ratios"] = hybrid_ratios(entry["rows"])
            suite.results.save()


# ----------------------------------------------------------------------------------------------- 8. ceiling

def measure_ceiling(suite: Suite, arch: str, *, seq: int) -> dict:
    """One sequence of `seq` tokens per step on this one device, parallel.cp = 1, full recomputation: tokens/s and
    peak memory of `ceiling_steps` timed steps (fewer than the throughput part's: a step is seconds long)."""
    cfg = run_config(suite, arch, seq=seq, batch=1, parallel={"recompute": "full"})
    model, optimizers = build_ours(cfg, suite.device)
    tokens, labels = random_batch(cfg.model.vocab_size, 1, seq, suite.device)
    autocast = suite.autocast()

    def step():
        loss, _ = train_step(model, optimizers, [(tokens, labels)], lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip,
                             autocast=autocast)
        return loss

    warmup, timed = suite.sizes.ceiling_steps
    few_steps = dataclasses.replace(suite, sizes=dataclasses.replace(suite.sizes, warmup_steps=warmup,
                                                                     timed_steps=timed))
    row = {"batch": 1, "params": sum(p.numel() for p in model.parameters()), "kernel": mixer_kernel(arch, suite.device)}
    row.update(time_training(few_steps, step, flops=flops_per_token(cfg.model), batch=1, seq=seq))
    return row


def run_ceiling(suite: Suite, part: Part) -> None:
    for seq in suite.sizes.ceiling_seqs:  # every architecture at 32k before any at 64k
        for arch in ARCHS:
            row = {"arch": arch, "seq": seq, "cp": 1, "recompute": "full"}
            part.point(f"ceiling:{arch}-{seq}", row, lambda: measure_ceiling(suite, arch, seq=seq))


# ------------------------------------------------------------------------------------------------- 3. peers

def hf_llama(m: ModelConfig, seq: int):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise Skip(f"transformers is not installed ({e})") from None
    config = LlamaConfig(hidden_size=m.d_model, intermediate_size=mlp_hidden_size(m), num_hidden_layers=m.n_layers,
                         num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, vocab_size=m.vocab_size,
                         max_position_embeddings=seq, rms_norm_eps=m.norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                         tie_word_embeddings=m.tie_embeddings, attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(config)


def _fla_models():
    try:
        import fla.models
    except ImportError as e:
        raise Skip(f"fla's models (flash-linear-attention) are not installed ({e})") from None
    return fla.models


def fla_gla(m: ModelConfig, seq: int):
    models = _fla_models()
    config = models.GLAConfig(hidden_size=m.d_model, expand_k=0.5, expand_v=1.0, num_heads=m.n_heads,
                              intermediate_size=mlp_hidden_size(m), num_hidden_layers=m.n_layers,
                              vocab_size=m.vocab_size, norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                              max_position_embeddings=seq, use_cache=False)
    return models.GLAForCausalLM(config)


def fla_rwkv7(m: ModelConfig, seq: int):
    models = _fla_models()
    d = m.d_model
    # our RWKV-7's LoRA widths (the reference's formula), so both have the same parameters
    config = models.RWKV7Config(hidden_size=d, head_dim=d // m.n_heads, num_hidden_layers=m.n_layers,
                                intermediate_size=mlp_hidden_size(m), decay_low_rank_dim=lora_rank(d, 2.5),
                                a_low_rank_dim=lora_rank(d, 2.5), v_low_rank_dim=lora_rank(d, 1.7),
                                gate_low_rank_dim=lora_rank(d, 5.0), vocab_size=m.vocab_size, norm_eps=m.norm_eps,
                                tie_word_embeddings=m.tie_embeddings, max_position_embeddings=seq, use_cache=False)
    return models.RWKV7ForCausalLM(config)


# peer → (our architecture it is compared with, builder, whether it needs CUDA)
PEERS = {"hf-llama": ("transformer", hf_llama, False), "fla-gla": ("gla", fla_gla, True),
         "fla-rwkv7": ("rwkv7", fla_rwkv7, True)}
GOALS = {"hf-llama": 1.1}  # ours / theirs wanted; 1.0 for the others


def measure_peer(suite: Suite, peer: str, *, seq: int, compiled: bool) -> dict:
    arch, build, needs_cuda = PEERS[peer]
    if needs_cuda and not suite.cuda:
        raise Skip("fla's models run fla's Triton kernels: CUDA only")
    if compiled and not suite.cuda:
        raise Skip("compiled points run on CUDA only, as parallel.compile")
    batch = max(1, suite.sizes.tokens_per_step // seq)
    cfg = run_config(suite, arch, seq=seq, batch=batch)
    torch.compiler.reset()
    torch.manual_seed(cfg.train.seed)
    with torch.device(suite.device):
        model = build(cfg.model, seq)
    model.train()
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=suite.cuda)
    forward = torch.compile(model) if compiled else model
    tokens, _ = random_batch(cfg.model.vocab_size, batch, seq, suite.device)
    autocast = suite.autocast()

    def step():
        with autocast:
            loss = forward(input_ids=tokens, labels=tokens).loss  # the model shifts the labels itself
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    row = {"arch": arch, "batch": batch, "params": sum(p.numel() for p in model.parameters()),
           "ours_params": count_params(cfg.model)}
    row.update(time_training(suite, step, flops=flops_per_token(cfg.model), batch=batch, seq=seq))
    return row


def peer_ratios(ours_rows: list[dict], peer_rows: list[dict]) -> list[dict]:
    """ours / theirs tokens/s at the same architecture, length and compile setting, and best against best."""
    def ok(rows):
        return [r for r in rows if r.get("status") == "ok"]

    ours = {(r["arch"], r["seq"], r["compile"]): r["tokens_per_s"] for r in ok(ours_rows)}
    theirs = {(r["peer"], r["seq"], r["compile"]): r["tokens_per_s"] for r in ok(peer_rows)}
    out = []
    for peer, (arch, _, _) in PEERS.items():
        for seq in sorted({r["seq"] for r in peer_rows if r["peer"] == peer}):
            for compile_ in (False, True, "best"):
                if compile_ == "best":
                    a = max((v for (ar, s, _), v in ours.items() if ar == arch and s == seq), default=None)
                    b = max((v for (p, s, _), v in theirs.items() if p == peer and s == seq), default=None)
                else:
                    a, b = ours.get((arch, seq, compile_)), theirs.get((peer, seq, compile_))
                if a is None or b is None:
                    continue
                goal = GOALS.get(peer, 1.0)
                out.append({"peer": peer, "arch": arch, "seq": seq, "compile": compile_, "ours_tokens_per_s": a,
                            "peer_tokens_per_s": b, "ratio": round(a / b, 3), "goal": goal,
                            "meets_goal": a / b >= goal})
    return out


def run_peers(suite: Suite, part: Part) -> None:
    entry = suite.results.part("peers")
    ours = suite.results.part("throughput")["rows"]
    for compiled in (False, True):
        for seq in suite.sizes.seqs:
            for peer in PEERS:
                row = {"peer": peer, "seq": seq, "compile": compiled}
                part.point(f"peer {'compiled' if compiled else 'eager'}:{peer}-{seq}", row,
                           lambda: measure_peer(suite, peer, seq=seq, compiled=compiled))
                entry["ratios"] = peer_ratios(ours, entry["rows"])
                suite.results.save()
    torch.compiler.reset()


# ------------------------------------------------------------------------------------ 4. longest sequence

def per_layer_saved_bytes(suite: Suite, make_cfg, mode: str, seq: int) -> int:
    """Saved-activation bytes of one block: a 2-block model's minus a 1-block model's (bf16 weights, batch 1)."""
    sizes = []
    for layers in (1, 2):
        cfg = make_cfg(layers, mode)
        model, _ = build_ours(cfg, suite.device)
        model = model.parts[0].to(torch.bfloat16).train()
        tokens, labels = random_batch(cfg.model.vocab_size, 1, seq, suite.device)
        sizes.append(saved_bytes(model, tokens, labels))
        del model
    return sizes[1] - sizes[0]


def activation_rows(suite: Suite, part: Part) -> None:
    k = suite.sizes.korthikanti
    s, h, a = k["seq"], k["d_model"], k["heads"]
    sbh = s * h

    def gpt(layers, mode):
        return build_config({"model": {"preset": "gpt", "d_model": h, "n_heads": a, "n_layers": layers, "seq_len": s,
                                       "vocab_size": 128}, "parallel": {"recompute": mode}})

    for mode in ("none", "selective", "full"):
        def measure(mode=mode):
            measured = per_layer_saved_bytes(suite, gpt, mode, s)
            formula = formula_bytes(mode, s=s, b=1, h=h, a=a)
            return {"measured_bytes": measured, "formula_bytes": formula, "measured_over_sbh": measured / sbh,
                    "formula_over_sbh": formula / sbh, "ratio": round(measured / formula, 4)}

        part.point("activations", {"model": "gpt preset", "recompute": mode, "seq": s, "d_model": h, "heads": a},
                   measure)
    for arch in suite.sizes.longest_archs:
        for mode in ("none", "selective", "full"):
            def measure(arch=arch, mode=mode):
                def make(layers, mode):
                    return run_config(suite, arch, seq=s, batch=1, parallel={"recompute": mode},
                                      model={"n_layers": layers})
                measured = per_layer_saved_bytes(suite, make, mode, s)
                m = make(1, mode).model
                predicted = activation_bytes_per_layer(m, s=s, b=1, recompute=mode, dtype_bytes=2)
                return {"d_model": m.d_model, "measured_bytes": measured, "predicted_bytes": predicted,
                        "measured_over_sbh": measured / (s * m.d_model),
                        "predicted_over_sbh": predicted / (s * m.d_model), "ratio": round(measured / predicted, 4)}

            part.point("activations", {"model": arch, "recompute": mode, "seq": s}, measure)


def _longest_within(probes: list[dict]):
    """The longest length a trial can have to finish in a given time, by t(L) = c + a·L + b·L² (fixed overhead,
    linear and quadratic work) through the three probes' seconds, with c, a, b ≥ 0."""
    lengths = torch.tensor([[1.0, p["len"], p["len"] ** 2] for p in probes], dtype=torch.float64)
    seconds = torch.tensor([p["seconds"] for p in probes], dtype=torch.float64)
    c, a, b = torch.linalg.solve(lengths, seconds).tolist()
    if b < 0 or a < 0 or c < 0:  # noisy timings: a line through the two longest probes, never below zero
        (l1, t1), (l2, t2) = [(p["len"], p["seconds"]) for p in probes[-2:]]
        a = max((t2 - t1) / (l2 - l1), 1e-12)
        c, b = max(t2 - a * l2, 0.0), 0.0

    def longest_within(t):
        t = max(t - c, 0.0)
        return t / a if b == 0 else (-a + math.sqrt(a * a + 4 * b * t)) / (2 * b)

    return longest_within


def longest_series(suite: Suite, arch: str, *, recompute: str, mst: int, deadline: float) -> dict:
    """Longest trainable length of one memory mode: three probes, a line through the last two peaks predicts it, then
    trials bisect between the longest that trained and the shortest that did not until 5% apart or out of time."""
    s = suite.sizes
    cfg = run_config(suite, arch, seq=s.probe_lens[0], batch=1,
                     parallel={"recompute": recompute, "minisequence_chunks": mst})
    model, optimizers = build_ours(cfg, suite.device)
    autocast = suite.autocast()
    if suite.cuda:
        capacity = s.capacity_bytes or torch.cuda.get_device_properties(suite.device).total_memory
    else:
        capacity = s.capacity_bytes
    trials = []

    def trial(length: int) -> bool:
        tokens, labels = random_batch(cfg.model.vocab_size, 1, length, suite.device)
        start = time.perf_counter()
        row = {"len": length}
        try:
            with MemoryMeter(suite.device, [*model.parameters(), *optimizer_tensors(optimizers)]) as meter:
                train_step(model, optimizers, [(tokens, labels)], lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip,
                           autocast=autocast)
                row["peak_bytes"] = meter.peak()
            row["status"] = "ok" if row["peak_bytes"] <= capacity else "over capacity"
        except torch.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as e:  # e.g. a kernel's index limit at a huge length: not trainable either, and said so
            row.update(status="error", reason=f"{type(e).__name__}: {str(e).strip()[:200]}")
        for o in optimizers:
            o.zero_grad(set_to_none=True)  # an out-of-memory step leaves gradients behind
        del tokens, labels
        free_memory(suite.device)
        row["seconds"] = round(time.perf_counter() - start, 3)
        trials.append(row)
        return row["status"] == "ok"

    result = {"capacity_gib": round(capacity / GIB, 3), "capacity_bytes": capacity, "trials": trials,
              "longest_ok": None, "first_failed": None, "predicted": None}
    trial(s.granularity)  # creates the optimizer states, so that every later trial's peak includes them
    trials.clear()
    if not all(trial(length) for length in s.probe_lens):
        ok = [t["len"] for t in trials if t["status"] == "ok"]
        return {**result, "longest_ok": max(ok, default=None), "first_failed": trials[-1]["len"],
                "stop": "a probe did not fit: the longest is below it"}
    (l1, p1), (l2, p2) = [(t["len"], t["peak_bytes"]) for t in trials[-2:]]
    slope = (p2 - p1) / (l2 - l1)
    fixed = p2 - slope * l2
    predicted = int((capacity - fixed) / slope) if slope > 0 else None
    result.update(bytes_per_token=round(slope, 1), fixed_gib=round(fixed / GIB, 3), predicted=predicted)
    longest_within = _longest_within(trials)
    g = s.granularity
    lo, hi, guess = s.probe_lens[-1], None, predicted
    while hi is None or hi - lo > max(g, 0.05 * lo):
        if guess is not None:  # first a little under the fit's prediction
            candidate, guess = int(0.97 * guess), None
        elif hi is None:
            candidate = int(lo * 1.25)  # the prediction trained: further up until a trial fails
        else:
            candidate = (lo + hi) // 2
        candidate = max(candidate // g * g, lo + g)
        if hi is not None:
            candidate = min(candidate, hi - g)
        within = int(longest_within((deadline - time.monotonic()) / 1.5)) // g * g  # 1.5: a margin on the model
        if within <= lo:
            return {**result, "longest_ok": lo, "first_failed": hi, "stop": "time bound"}
        if trial(min(candidate, within)):
            lo = min(candidate, within)
        else:
            hi = min(candidate, within)
    return {**result, "longest_ok": lo, "first_failed": hi, "stop": "converged (within 5%)"}


def run_longest(suite: Suite, part: Part) -> None:
    activation_rows(suite, part)
    series = [(arch, mode, mst) for arch in suite.sizes.longest_archs for mode, mst in suite.sizes.memory_modes]
    for i, (arch, mode, mst) in enumerate(series):
        share = part.left() / (len(series) - i)  # even shares of what is left; unused time rolls on
        deadline = time.monotonic() + min(share, suite.sizes.series_seconds or share)
        part.point(f"longest:{arch}", {"arch": arch, "recompute": mode, "mst_chunks": mst},
                   lambda: longest_series(suite, arch, recompute=mode, mst=mst, deadline=deadline))


# --------------------------------------------------------------------------------------- 5. memory by phase

def measure_phases(suite: Suite, arch: str, recompute: str) -> dict:
    seq = suite.sizes.memory_seq
    batch = max(1, suite.sizes.tokens_per_step // seq)
    cfg = run_config(suite, arch, seq=seq, batch=batch, parallel={"recompute": recompute})
    model, optimizers = build_ours(cfg, suite.device)
    tokens, labels = random_batch(cfg.model.vocab_size, batch, seq, suite.device)
    autocast = suite.autocast()
    # one whole step first: the optimizer states then exist, as in every step after the first
    train_step(model, optimizers, [(tokens, labels)], lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip,
               autocast=autocast)
    module = model.parts[0]
    phases = {}
    # train_step's own calls, one phase at a time
    with MemoryMeter(suite.device, [*model.parameters(), *optimizer_tensors(optimizers)]) as meter:
        phases["start"] = {"now_gib": meter.now() / GIB}
        with autocast:
            loss = module(tokens, labels=labels)
        phases["forward"] = {"peak_gib": meter.peak() / GIB, "now_gib": meter.now() / GIB}
        meter.mark()
        loss.backward()
        phases["backward"] = {"peak_gib": meter.peak() / GIB, "now_gib": meter.now() / GIB}
        meter.mark()
        model.clip_grad_norm_(cfg.optim.grad_clip)
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        phases["optimizer"] = {"peak_gib": meter.peak() / GIB, "now_gib": meter.now() / GIB}
    cluster = Cluster.load(REPO / "configs/clusters" / ("h100-nvlink-ib.toml" if suite.cuda else "cpu-gloo.toml"))
    predicted = memory_breakdown(cfg.model, Layout(micro_batch=batch, global_batch=batch, recompute=recompute),
                                 seq, cluster)
    # max_memory_allocated counts tensors only: the CUDA context and allocator slack (`reserved`) are not in it
    predicted_peak = sum(v for k, v in predicted.items() if k != "reserved")
    measured_peak = max(p["peak_gib"] for p in phases.values() if "peak_gib" in p)
    return {"seq": seq, "batch": batch, "params": sum(p.numel() for p in model.parameters()),
            "phases": {k: {n: round(v, 3) for n, v in p.items()} for k, p in phases.items()},
            "measured_peak_gib": round(measured_peak, 3),
            "predicted_gib": {k: round(v / GIB, 3) for k, v in predicted.items()},
            "predicted_peak_gib": round(predicted_peak / GIB, 3),
            "measured_over_predicted": round(measured_peak * GIB / predicted_peak, 3), "cluster": cluster.name}


def run_memory(suite: Suite, part: Part) -> None:
    for arch in ("transformer", "gla"):
        for recompute in ("none", "full"):
            part.point("memory", {"arch": arch, "recompute": recompute},
                       lambda: measure_phases(suite, arch, recompute))


# -------------------------------------------------------------------------------------------- 6. checkpoint

CHECKPOINT_SCRIPT = REPO / "bench" / "checkpoint.py"
# What this part passes to bench/checkpoint.py: GLA's ~340M config (its model and AdamW state are saved), this device,
# one process.
CHECKPOINT_OPTIONS = ("--config", "--device", "--nproc")
CHECKPOINT_GOAL = 0.10  # async blocks training at most this fraction of the synchronous save's time (on a GPU)


def checkpoint_blocking(suite: Suite, part: Part) -> dict:
    if not CHECKPOINT_SCRIPT.exists():
        raise Skip("bench/checkpoint.py is not in this checkout yet (asynchronous checkpoints, issue 16)")
    usage = subprocess.run([sys.executable, str(CHECKPOINT_SCRIPT), "--help"], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    missing = [opt for opt in CHECKPOINT_OPTIONS if opt not in usage.stdout]
    if usage.returncode or missing:
        raise Skip(f"bench/checkpoint.py --help {'failed' if usage.returncode else 'lists no ' + ', '.join(missing)}: "
                   f"this part passes {' '.join(CHECKPOINT_OPTIONS)}")
    config, _ = suite.sizes.models["gla"]
    options = ["--config", config, "--device", suite.device.type, "--nproc", "1"]
    command = [sys.executable, str(CHECKPOINT_SCRIPT), *options]
    # a session of its own, so that a timeout (or this part's watchdog) stops its worker processes too
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=max(part.left(), 1))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.returncode:
        last = [line for line in stderr.splitlines() if line.strip().strip("^~ ")] or [""]  # not a caret line
        raise RuntimeError(f"bench/checkpoint.py {' '.join(options)} exited {process.returncode}: {last[-1]}")
    for start in (m.start() for m in reversed(list(re.finditer(r"^\{", stdout, re.M)))):  # its JSON is printed last
        with contextlib.suppress(json.JSONDecodeError):
            result = json.loads(stdout[start:])
            ratio = result.get("async_over_sync_blocked")
            return {"command": " ".join(["python bench/checkpoint.py", *options]), "async_over_sync_blocked": ratio,
                    "goal": CHECKPOINT_GOAL, "meets_goal": ratio <= CHECKPOINT_GOAL if ratio is not None else None,
                    "result": result}
    raise RuntimeError(f"bench/checkpoint.py printed no JSON object: {stdout.strip()[-300:]}")


def run_checkpoint(suite: Suite, part: Part) -> None:
    part.point("checkpoint", {"what": "training blocked by a synchronous and an asynchronous save"},
               lambda: checkpoint_blocking(suite, part))


# ------------------------------------------------------------------------------------------------- report

def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows], ""]


def _not_ok(rows: list[dict]) -> list[str]:
    """One line per reason for the points that did not run or failed."""
    by_reason: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") != "ok":
            by_reason.setdefault(f"{r.get('status')}: {r.get('reason', '')}", []).append(r)
    return [f"- {len(rs)} × {reason}" for reason, rs in by_reason.items()] + ([""] if by_reason else [])


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def kernels_section(entry: dict) -> list[str]:
    rows = _ok(entry["rows"])
    torch_ms = {(r["op"], r["T"], r["D"], r["dtype"]): r for r in rows if r["impl"] == "torch"}
    table = []
    for r in rows:
        if r["impl"] == "torch":
            continue
        ours = torch_ms.get((r["op"], r["T"], r["D"], r["dtype"]), {})
        grads = [e["max_rel"] for name, e in r["errors"].items() if name != "o"]
        speedup = (ours.get("fwd_bwd_ms") / r["fwd_bwd_ms"]) if ours.get("fwd_bwd_ms") and r.get("fwd_bwd_ms") else None
        table.append([r["kernel"], r["T"], r["D"], r["dtype"], r["fwd_ms"], r.get("bwd_ms"), ours.get("fwd_bwd_ms"),
                      speedup, r["errors"]["o"]["max_rel"], max(grads, default=None), r["finite"]])
    lines = ["Milliseconds are medians; errors are max |x − ref| / max |ref| against a float64 run of our torch path "
             "on the same inputs.", ""]
    lines += _table(["kernel", "T", "D", "dtype", "fwd ms", "bwd ms", "torch fwd+bwd ms", "speed-up vs torch",
                     "max rel err o", "max rel err grads", "finite"], table)
    ours = [[r["op"], r["T"], r["D"], r["dtype"], r["fwd_ms"], r.get("bwd_ms"), r["errors"]["o"]["max_rel"],
             max((e["max_rel"] for n, e in r["errors"].items() if n != "o"), default=None)]
            for r in rows if r["impl"] == "torch"]
    lines += ["Our torch path (the CPU path) on this device:", ""]
    lines += _table(["op", "T", "D", "dtype", "fwd ms", "bwd ms", "max rel err o", "max rel err grads"], ours)
    return lines


def throughput_section(entry: dict) -> list[str]:
    table = [[r["arch"], r["seq"], r["batch"], r["compile"], r["kernel"], r["tokens_per_s"], r["tflops"], r["mfu"],
              r["peak_memory_gib"], r["step_ms"], r["warmup_s"]] for r in _ok(entry["rows"])]
    return _table(["arch", "seq", "batch", "compile", "mixer", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "step ms",
                   "warm-up s"], table)


def peers_section(entry: dict) -> list[str]:
    table = [[r["peer"], r["seq"], r["batch"], r["compile"], r["tokens_per_s"], r["tflops"], r["peak_memory_gib"],
              r["params"], r["ours_params"]] for r in _ok(entry["rows"])]
    lines = _table(["peer", "seq", "batch", "compile", "tokens/s", "TFLOP/s (our FLOPs)", "peak GiB", "params",
                    "our params"], table)
    ratios = [[r["peer"], r["seq"], r["compile"], r["ours_tokens_per_s"], r["peer_tokens_per_s"], r["ratio"],
               r["goal"], r["meets_goal"]] for r in entry.get("ratios", [])]
    return lines + ["Ours ÷ theirs (tokens/s):", ""] + _table(
        ["peer", "seq", "compile", "ours tokens/s", "theirs tokens/s", "ours ÷ theirs", "goal", "met"], ratios)


def longest_section(entry: dict) -> list[str]:
    acts = [r for r in _ok(entry["rows"]) if "model" in r]
    table = [[r["model"], r["recompute"], r["seq"], r["measured_over_sbh"], r.get("formula_over_sbh",
              r.get("predicted_over_sbh")), "Korthikanti" if "formula_bytes" in r else "perfmodel", r["ratio"]]
             for r in acts]
    lines = ["Saved activation bytes per layer (batch 1, bf16 weights), in units of sbh:", ""]
    lines += _table(["model", "recompute", "s", "measured / sbh", "expected / sbh", "expected from",
                     "measured ÷ expected"], table)
    series = [r for r in _ok(entry["rows"]) if "mst_chunks" in r]
    table = [[r["arch"], r["recompute"], r["mst_chunks"], r["longest_ok"], r["first_failed"], r["predicted"],
              r.get("bytes_per_token"), len(r["trials"]), r["stop"]] for r in series]
    lines += [f"Longest trainable sequence, batch 1 (capacity {_cell(series[0]['capacity_gib'] if series else None)} "
              f"GiB): trials bisect between the longest that trained and the shortest that did not; 'predicted' is "
              f"the linear fit of peak memory through the two probes.", ""]
    return lines + _table(["arch", "recompute", "MsT chunks", "longest trained", "first failed", "predicted (fit)",
                           "bytes/token", "trials", "stopped by"], table)


def memory_section(entry: dict) -> list[str]:
    table = [[r["arch"], r["recompute"], r["seq"], r["batch"], r["phases"]["start"]["now_gib"],
              r["phases"]["forward"]["peak_gib"], r["phases"]["backward"]["peak_gib"],
              r["phases"]["optimizer"]["peak_gib"], r["predicted_peak_gib"], r["measured_over_predicted"]]
             for r in _ok(entry["rows"])]
    lines = ["GiB allocated (torch's allocator; on CPU live tensor storages). Predicted: launch.perfmodel's "
             "memory_breakdown for the same run, without its `reserved` allowance.", ""]
    return lines + _table(["arch", "recompute", "seq", "batch", "at start", "forward peak", "backward peak",
                           "optimizer peak", "predicted peak", "measured ÷ predicted"], table)


def checkpoint_section(entry: dict) -> list[str]:
    lines = []
    for r in _ok(entry["rows"]):
        lines += [f"`{r['command']}`: asynchronous ÷ synchronous "
                  f"blocking {_cell(r['async_over_sync_blocked'])} (goal ≤ {r['goal']}: "
                  f"{_cell(r['meets_goal'])}).", "", f"```\n{json.dumps(r['result'], indent=1)}\n```", ""]
    return lines


def hybrid_section(entry: dict) -> list[str]:
    lines = throughput_section(entry)
    ratios = [[r["hybrid"], r["parent"], r["seq"], r["tokens_per_s_ratio"], r["peak_memory_ratio"]]
              for r in entry.get("ratios", [])]
    return lines + ["Hybrid ÷ pure parent:", ""] + _table(["hybrid", "parent", "seq", "tokens/s ratio",
                                                          "peak memory ratio"], ratios)


def ceiling_section(entry: dict) -> list[str]:
    table = [[r["arch"], r["seq"], r["kernel"], r["tokens_per_s"], r["tflops"], r["mfu"], r["peak_memory_gib"],
              r["step_ms"]] for r in _ok(entry["rows"])]
    return _table(["arch", "seq (batch 1, cp 1, full recompute)", "mixer", "tokens/s", "TFLOP/s", "MFU", "peak GiB",
                   "step ms"], table)


SECTIONS = {"kernels": ("1. Kernels", kernels_section), "throughput": ("2. Training throughput", throughput_section),
            "peers": ("3. Peers in the same run", peers_section),
            "longest": ("4. Longest trainable sequence", longest_section),
            "memory": ("5. Memory by phase", memory_section), "checkpoint": ("6. Checkpoint blocking",
                                                                             checkpoint_section),
            "hybrid": ("7. Hybrids and their pure parents", hybrid_section),
            "ceiling": ("8. Single-device context ceiling", ceiling_section)}


def write_report(suite: Suite) -> None:
    meta = suite.results.data["meta"]
    lines = [f"# GPU suite: {meta['device_name']}, {meta['date']}", "",
             f"`python bench/gpu_suite.py {' '.join(meta['argv'])}`, commit {meta['commit'] or 'unknown'}; "
             f"{'SMOKE (tiny sizes: checks the suite, not the hardware); ' if meta['smoke'] else ''}"
             f"every number was measured in this run unless its column says predicted.", ""]
    lines += _table(["device", "torch", "CUDA", "triton", "fla", "transformers", "python", "budget min"],
                    [[meta["device_name"], meta["torch"], meta["cuda"], meta["triton"], meta["fla"],
                      meta["transformers"], meta["python"], meta["minutes"]]])
    for name, entry in suite.results.data["parts"].items():
        title, section = SECTIONS[name]
        lines += [f"## {title}", "", f"Status: {entry['status']}"
                  + (f" ({entry['reason']})" if entry.get("reason") else "")
                  + (f", {entry['seconds']:.0f} s" if "seconds" in entry else ""), ""]
        if (suite.out / f"{name}.png").exists():
            lines += [f"![{name}]({name}.png)", ""]
        try:
            lines += section(entry)
        except (KeyError, TypeError, ValueError) as e:  # a partial row must not cost the rest of the report
            lines += [f"(table not made: {type(e).__name__}: {e})", ""]
        lines += _not_ok(entry["rows"])
    (suite.out / "report.md").write_text("\n".join(lines))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    return plt


def _bars(ax, labels: list[str], series: dict[str, list]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], [v or 0 for v in values], width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=45, ha="right", fontsize=7)
    ax.legend(fontsize=7)


def plot_part(suite: Suite, name: str) -> None:
    """<name>.png for the parts that have a plot, from their ok rows."""
    rows = _ok(suite.results.part(name)["rows"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if name == "kernels":
        dtype = "bf16" if any(r["dtype"] == "bf16" and r.get("fwd_bwd_ms") for r in rows) else "fp32"
        keys = sorted({(r["op"], r["T"], r["D"]) for r in rows if r["dtype"] == dtype}, key=str)
        by = {(r["op"], r["T"], r["D"], r["impl"]): r for r in rows if r["dtype"] == dtype}
        impls = sorted({r["impl"] for r in rows})
        _bars(ax, [f"{op} T{T} D{D}" for op, T, D in keys],
              {impl: [by.get((*k, impl), {}).get("fwd_bwd_ms") or by.get((*k, impl), {}).get("fwd_ms") for k in keys]
               for impl in impls})
        ax.set_yscale("log")
        ax.set(ylabel="ms (fwd+bwd; fwd where no backward ran)", title=f"Kernels, {dtype}")
    elif name == "throughput" or name == "peers":
        ours = _ok(suite.results.part("throughput")["rows"])
        peers = _ok(suite.results.part("peers")["rows"])
        points = [(f"{r['arch']} {r['seq']}", f"ours{' compiled' if r['compile'] else ''}", r["tokens_per_s"])
                  for r in ours]
        points += [(f"{PEERS[r['peer']][0]} {r['seq']}", f"{r['peer']}{' compiled' if r['compile'] else ''}",
                    r["tokens_per_s"]) for r in peers]
        labels = sorted({p[0] for p in points}, key=lambda s: (s.split()[0], int(s.split()[1])))
        series = {}
        for label, who, value in points:
            series.setdefault(who, [None] * len(labels))[labels.index(label)] = value
        _bars(ax, labels, series)
        ax.set(ylabel="tokens/s", title="Training throughput (same shapes and batch)")
        name = "throughput"  # one plot for both parts
    elif name == "longest":
        series_rows = [r for r in rows if "mst_chunks" in r]
        labels = [f"{r['arch']} {r['recompute']}{' +MsT' if r['mst_chunks'] > 1 else ''}" for r in series_rows]
        _bars(ax, labels, {"longest trained": [r["longest_ok"] for r in series_rows],
                           "predicted (fit)": [r["predicted"] for r in series_rows]})
        ax.set_yscale("log")
        ax.set(ylabel="tokens (batch 1)", title="Longest trainable sequence per memory mode")
    elif name == "memory":
        labels = [f"{r['arch']} {r['recompute']}" for r in rows]
        _bars(ax, labels, {**{f"{phase} peak": [r["phases"][phase]["peak_gib"] for r in rows]
                              for phase in ("forward", "backward", "optimizer")},
                           "predicted peak": [r["predicted_peak_gib"] for r in rows]})
        ax.set(ylabel="GiB", title="Memory by phase, measured and predicted")
    else:
        plt.close(fig)
        return
    fig.tight_layout()
    fig.savefig(suite.out / f"{name}.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main

PARTS = {"kernels": run_kernels, "throughput": run_throughput, "peers": run_peers, "longest": run_longest,
         "memory": run_memory, "checkpoint": run_checkpoint, "hybrid": run_hybrid, "ceiling": run_ceiling}


def run_parts(suite: Suite, names: list[str], parts: dict | None = None) -> None:
    """Run the parts in order, each within its share of the time left; record skipped and cut parts."""
    parts = parts or PARTS
    reserve = REPORT_RESERVE_S * suite.sizes.prior_scale
    for i, name in enumerate(names):
        entry = suite.results.part(name)
        left = suite.deadline - time.monotonic() - reserve
        budget = left * PART_SHARES[name] / sum(PART_SHARES[n] for n in names[i:])
        needed = PART_MIN_SECONDS[name] * suite.sizes.prior_scale
        if budget < needed:
            entry.update(status="skipped", reason=f"would overrun: needs at least {needed:.0f} s, "
                                                  f"{max(budget, 0):.0f} s of the --minutes budget left for it")
            suite.results.save()
            print(f"[{name}] skipped: {entry['reason']}", flush=True)
            continue
        entry["status"] = "running"
        print(f"[{name}] up to {budget:.0f} s", flush=True)
        start = time.monotonic()
        try:
            with watchdog(budget * WATCHDOG_GRACE):
                parts[name](suite, Part(suite, name, start + budget))
            entry["status"] = "ok"
        except PartTimeout:
            entry.update(status="cut", reason=f"stopped at its time limit ({budget:.0f} s); its rows are kept")
        except Exception as e:
            traceback.print_exc()
            entry.update(status="error", reason=f"{type(e).__name__}: {e}")
        entry["seconds"] = round(time.monotonic() - start, 1)
        free_memory(suite.device)
        suite.results.save()
        for what, make in (("plot", lambda: plot_part(suite, name)), ("report", lambda: write_report(suite))):
            try:
                make()
            except Exception as e:  # the JSON is what counts; both are made again after the next part
                print(f"[{name}] {what} not written: {type(e).__name__}: {e}", flush=True)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def run_meta(device: torch.device, argv: list[str], *, smoke: bool, minutes: float) -> dict:
    try:  # the device machine's copy of the tree may have no git
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    except OSError:
        commit = None
    return {"device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else (platform.processor() or platform.machine() or "cpu"),
            "date": datetime.date.today().isoformat(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": argv, "smoke": smoke, "minutes": minutes, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _version("triton"), "fla": _version("fla"), "transformers": _version("transformers"),
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "commit": commit.stdout.strip() if commit and commit.returncode == 0 else None}


def default_out(device: torch.device, smoke: bool, root: Path) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia ")).strip("-")
    return root / f"gpu-{slug}-{datetime.date.today().isoformat()}{'-smoke' if smoke else ''}"


def summary(results: dict) -> str:
    """The lines printed last: each part's status and the headline numbers."""
    lines = []
    for name, entry in results["parts"].items():
        rows = entry["rows"]
        ok = sum(r.get("status") == "ok" for r in rows)
        lines.append(f"{name:<11} {entry['status']:<8} {ok}/{len(rows)} points ok  {entry.get('reason', '')}")
    for r in results["parts"].get("peers", {}).get("ratios", []):
        if r["compile"] == "best":
            lines.append(f"  ours/{r['peer']} at {r['seq']}: {r['ratio']:.2f} (goal {r['goal']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output directory (default: <results-root>/gpu-<device>-<date>)")
    parser.add_argument("--results-root", type=Path,
                        help="where the default output directory goes (default: bench/results; runs/ with --smoke)")
    parser.add_argument("--minutes", type=float, default=8.0, help="time bound of the whole run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the suite itself (CPU: ~1 min)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    root = args.results_root or REPO / ("runs" if args.smoke else "bench/results")  # a smoke run is not published
    out = args.out or default_out(device, args.smoke, root)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = Results(out / "results.json", run_meta(device, argv, smoke=args.smoke, minutes=args.minutes))
    suite = Suite(SMOKE if args.smoke else FULL, device, out, results, deadline=started + 60 * args.minutes)
    print(f"GPU suite on {results.data['meta']['device_name']} → {out} (budget {args.minutes:g} min)", flush=True)
    run_parts(suite, names)
    results.data["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results.save()
    write_report(suite)
    print(summary(results.data), flush=True)


if __name__ == "__main__":
    main()
