"""What a training step costs beyond its own math: the collectives and tensor→host reads the project's code makes,
counted per step on 2 gloo processes running the real training loop.

On GPUs every tensor→host read (`.item()`, `bool(t)`, `.cpu()`, ...) stops the host from running ahead of the device,
and every collective costs at least its latency. A non-logged step may make no host read and no collective beyond
the gradient norm's reduction; every `train.sync_every` steps one all-reduce agrees on stop signals.

Only calls made directly by the project's packages count (the calling frame's file is in pretrain/, parallel/,
launch/ or data/): torch's own (FSDP's reduce-scatters, DTensor's redistributions) are the math of the step.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import build_config
from tests.dist import run_distributed

REPO = Path(__file__).resolve().parents[2]
PROJECT = tuple(f"{REPO / package}/" for package in ("pretrain", "parallel", "launch", "data"))
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
               "all_to_all", "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather",
               "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter",
               "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv", "monitored_barrier")
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

STEPS, LOG_INTERVAL, SYNC_EVERY = 8, 4, 3
LAYOUTS = {"dp2-fsdp": {"dp": 2, "data_parallel": "fsdp"}, "tp2": {"tp": 2}}


def _count_calls() -> tuple[list[tuple[int, str, str, str]], list[int]]:
    """Wrap the collectives and host reads; return the list the calls go to, (step, kind, name, caller), and the
    one-element list holding the step they count for (train_step's calls so far)."""
    import pretrain.train as train_module

    calls, step = [], [0]

    def counted(kind, name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1)
            path = caller.f_code.co_filename
            if path.startswith(PROJECT):
                calls.append((step[0], kind, name, f"{path[len(str(REPO)) + 1:]}:{caller.f_code.co_name}"))
            return fn(*args, **kwargs)
        return wrapper

    def next_step(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            step[0] += 1  # calls after a step's train_step, until the next one, belong to that step
            return fn(*args, **kwargs)
        return wrapper

    originals = {getattr(dist, name): name for name in COLLECTIVES if hasattr(dist, name)}
    wrappers = {fn: counted("collective", name, fn) for fn, name in originals.items()}
    # The project's modules may hold a collective under another name (`_all_gather = dist.all_gather_...`).
    modules = [dist, dist.distributed_c10d] + [m for m in list(sys.modules.values())
                                                 if str(getattr(m, "__file__", "")).startswith(PROJECT)]
    for module in modules:
        for attr, value in list(vars(module).items()):
            if callable(value) and value in wrappers:
                setattr(module, attr, wrappers[value])
    for name in HOST_READS:
        setattr(torch.Tensor, name, counted("host read", name, getattr(torch.Tensor, name)))
    train_module.train_step = next_step(train_module.train_step)
    return calls, step


def _train_counting(trees: list[dict]) -> list[list]:
    """Each run's calls, the runs one after the other in this process (one start-up of the processes for all)."""
    from pretrain.train import train

    calls, step = _count_calls()
    per_run = []
    for tree in trees:
        step[0] = 0
        train(build_config({}, tree))
        per_run.append(list(calls))
        calls.clear()
    return per_run


def _tree(run_dir, **parallel) -> dict:
    return {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 32},
        "data": {"path": "synthetic"},
        "parallel": parallel,
        "optim": {"lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "run_dir": str(run_dir), "eval_interval": 0,
                  "sync_every": SYNC_EVERY},
        "checkpoint": {"interval": 0, "save_at_end": False},
        "log": {"interval": LOG_INTERVAL, "progress": False, "tensorboard": False},
    }


def _by_step(calls) -> dict[int, Counter]:
    steps = {s: Counter() for s in range(1, STEPS + 1)}
    for step, kind, name, caller in calls:
        if step:
            steps[step][(kind, name, caller)] += 1
    return steps


def test_a_non_logged_step_reads_nothing_and_reduces_only_the_gradient_norm(tmp_path):
    norm = ("collective", "all_reduce", "parallel/parallelize.py:_sum_of_squares")
    stop_flags = ("collective", "all_reduce", "launch/preemption.py:should_stop")
    trees = [_tree(tmp_path / name, **layout) for name, layout in LAYOUTS.items()]
    for rank_runs in run_distributed(_train_counting, 2, trees):
        for layout, run_calls in zip(LAYOUTS, rank_runs):
            steps = _by_step(run_calls)
            logged = {s for s in steps if s % LOG_INTERVAL == 0}
            synced = {s for s in steps if s % SYNC_EVERY == 0} - logged
            plain = sorted(set(steps) - logged - synced)
            # The layout's math may call collectives too (tensor parallelism's vocabulary-parallel cross-entropy);
            # never a host read.
            math = steps[plain[0]] - Counter([norm])
            assert all(kind == "collective" and caller.startswith("parallel/") and "parallelize.py" not in caller
                       for kind, _, caller in math), (layout, math)
            for step in plain:
                assert steps[step] == math + Counter([norm]), (layout, step, steps[step])
            for step in sorted(synced):  # plus one all-reduce of the stop flags, and reading its result
                expected = math + Counter([norm, stop_flags, ("host read", "tolist", stop_flags[2])])
                assert steps[step] == expected, (layout, step, steps[step])
            for step in sorted(logged):  # the counting sees reads where they are due: loss, norm, step times
                reads = sum(n for (kind, *_), n in steps[step].items() if kind == "host read")
                assert reads >= 3, (layout, step, steps[step])
