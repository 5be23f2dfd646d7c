"""Dropout's random numbers under every layout follow parallel/random.py's rules (gpt preset: dropout 0.1 on the
embeddings, the residual branches and the attention probabilities; gloo, float32).

What happened before parallel/random.py (torch 2.13, CPU/gloo, per-rank seeds `train.seed + 1 + rank`), found with
the probe `count_dtensor_random_ops` below: every dropout on the residual stream (the embedding's and two per block)
went through DTensor's random-op path, which on CUDA creates the OffsetBasedRNGTracker with a world-wide broadcast.
On CPU that path has no tracker and each rank drew from its own generator, so
- tp2 without SP: the `Replicate()` residual stream differed across the two tp ranks from the first block on;
  the DTensor still claimed equal copies (`test_before_replicated_residual_diverged` keeps this as a test);
- tp2 + SP: the sequence shards got different masks (by the per-rank seeds);
- pp2·tp2: it finished (no tracker, no broadcast: the CUDA deadlock cannot show on CPU);
- dp2: plain tensors and per-rank seeds: different masks.

The runs record every mask (`recording_dropout` stands in for `F.dropout` and keeps the mask it drew) and check
each rule. The tensor-parallel runs are then compared with one process that applies the same per-token masks
(assembled from the ranks': concatenated over the sequence or the heads, or the common one where replicated):
losses and final parameters agree within the layout tests' 1e-5.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.tensor._dispatch as dtensor_dispatch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from parallel import parallelize as parallelize_module
from parallel.mesh import ParallelDims
from parallel.random import _SPREAD, _spread, seed_streams, stream_seed
from pretrain.config import build_config
from pretrain.optim import lr_at
from pretrain.train import mean_across_ranks, seed_everything, train, train_step
from tests.dist import run_distributed
from tests.parallel.layouts import TOLERANCE, build, full_params, global_batch, local_micro_batches

GPT = {"preset": "gpt", "d_model": 32, "n_layers": 4, "n_heads": 4, "vocab_size": 67, "seq_len": 16}
STEPS = 2


def gpt_config(parallel: dict, train_overrides: dict | None = None):
    """The gpt preset at the layout tests' size: 4 blocks, d=32, 4 heads, T=16, 2 micro-batches of 4 per step."""
    return build_config({
        "model": GPT, "parallel": parallel,
        "optim": {"lr": 1e-3, "eps": 1e-6, "warmup_steps": 1, "grad_clip": 0.5},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 4, "eval_interval": 0, "seed": 3,
                  **(train_overrides or {})},
    })


@contextmanager
def count_dtensor_random_ops():
    """Counts random ops dispatched on DTensors without an RNG tracker: torch 2.13's DTensor dispatcher asks
    `is_rng_supported_mesh` there, just before it would create the OffsetBasedRNGTracker (and broadcast)."""
    count = [0]
    supported = dtensor_dispatch.is_rng_supported_mesh

    def counting(mesh):
        count[0] += 1
        return supported(mesh)

    with mock.patch.object(dtensor_dispatch, "is_rng_supported_mesh", counting):
        yield count


@contextmanager
def recording_dropout(masks: list):
    """`F.dropout` (nn.Dropout's and the unfused attention's) drawing its mask from the current generator as
    `torch.native_dropout` does, and appending each mask to `masks`."""
    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        out, mask = torch.native_dropout(x, p, True)
        masks.append((mask.to_local() if isinstance(mask, DTensor) else mask).numpy().copy())
        return out

    with mock.patch.object(F, "dropout", dropout):
        yield


def assembled(rank_masks: tuple[np.ndarray, ...], shape: torch.Size) -> np.ndarray:
    """One process's mask of `shape` from the tp ranks' masks of one call: concatenated along the dimension they
    split (the sequence under SP, the heads in attention), or the mask they share where the input was replicated."""
    for dim, (part, whole) in enumerate(zip(rank_masks[0].shape, shape)):
        if part != whole:
            return np.concatenate(rank_masks, axis=dim)
    return rank_masks[0]


@contextmanager
def replaying_dropout(calls: list[tuple[np.ndarray, ...]]):
    """`F.dropout` applying the given masks, call by call, the way `torch.native_dropout` applies its own."""
    calls = iter(calls)

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        mask = torch.from_numpy(assembled(next(calls), x.shape))
        return x.mul(mask.to(x.dtype)).mul_(1 / (1 - p))

    with mock.patch.object(F, "dropout", dropout):
        yield
    assert next(calls, None) is None, "the single-process run made fewer dropout calls than the parallel one"


def train_gpt(parallel: dict, *, train_overrides: dict | None = None, replay=None, before: bool = False,
              steps: int = STEPS) -> dict:
    """The gpt preset trained `steps` steps under `parallel` with the training loop's build, seeding and step, in one
    rank of `run_distributed` or in one process. `replay`: the masks to apply (one process). `before`: as the code
    was before parallel/random.py: per-rank seeds, dropout on DTensors left to DTensor. Returns the logged losses,
    the full parameters, the masks drawn, the DTensor random ops counted, this rank's mesh coordinates and the first
    block's first output (local)."""
    cfg = gpt_config(parallel, train_overrides)
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims.from_config(cfg, world)
    mesh = dims.build_mesh("cpu") if world > 1 else None
    with mock.patch.object(parallelize_module, "apply_dropout_rng", lambda *args: None) if before else nullcontext():
        model, optimizers = build(cfg, mesh)
    if before:
        seed_everything(cfg.train.seed + 1 + dist.get_rank())  # pretrain.train's old per-rank seed, after building
    first_block_outputs = []
    for part in model.parts:
        block = next(iter(part.layers.values()))
        block.register_forward_hook(lambda module, args, output: first_block_outputs.append(
            (output[0].to_local() if isinstance(output[0], DTensor) else output[0]).detach().numpy().copy()))
    dp_rank = mesh.get_local_rank("dp") if mesh is not None else 0
    losses, masks = [], []
    with (replaying_dropout(replay) if replay is not None else recording_dropout(masks)), \
            count_dtensor_random_ops() as dtensor_random_ops:
        for step in range(1, steps + 1):
            if not before:
                seed_streams(cfg.train.seed, mesh, step=step, device=torch.device("cpu"))  # as pretrain.train does
            micro_batches = local_micro_batches(global_batch(step, cfg), cfg, dp_rank=dp_rank, dp=dims.dp)
            loss, _ = train_step(model, optimizers, micro_batches, lr=lr_at(step, cfg.optim, steps),
                                 grad_clip=cfg.optim.grad_clip, autocast=torch.autocast("cpu", enabled=False))
            losses.append(mean_across_ranks(loss))
    coordinates = {name: mesh.get_local_rank(name) for name in ("pp", "dp", "tp")} if mesh is not None else {}
    return {"losses": losses, "params": full_params(model), "masks": masks, "dtensor_random_ops": dtensor_random_ops[0],
            "coordinates": coordinates, "first_block_output": first_block_outputs[0] if first_block_outputs else None}


TP2 = {"tp": 2, "sequence_parallel": False}
TP2_SP = {"tp": 2}
TWO_PROCESS_RUNS = {
    "before tp2": dict(parallel=TP2, before=True),
    "tp2": dict(parallel=TP2),
    "tp2-sp": dict(parallel=TP2_SP),
    "tp2-sp selective": dict(parallel={**TP2_SP, "recompute": "selective"}),
    "tp2-sp full": dict(parallel={**TP2_SP, "recompute": "full"}),
    "dp2": dict(parallel={"dp": 2}, train_overrides={"micro_batch": 2}),
    "pp2": dict(parallel={"pp": 2}),
}


def two_process_runs(run_dir: str) -> dict:
    """Every 2-process run in one set of processes (each start costs many seconds on a small machine)."""
    results = {name: train_gpt(**kwargs) for name, kwargs in TWO_PROCESS_RUNS.items()}
    results["training loop tp2"] = train_synthetic(f"{run_dir}/straight", TP2)
    results["saved as dp2"] = train_synthetic(f"{run_dir}/resharded", {"dp": 2}, exit_after_steps=1)
    results["resumed as tp2"] = train_synthetic(f"{run_dir}/resharded", TP2)
    return results


@pytest.fixture(scope="module")
def two_process(tmp_path_factory) -> list[dict]:
    return run_distributed(two_process_runs, 2, str(tmp_path_factory.mktemp("run")), timeout=600)


def run(results: list[dict], name: str) -> list[dict]:
    """The named run's result on each rank."""
    return [rank[name] for rank in results]


def masks_by_kind(result: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(residual-stream masks (B, T, d): embedding and residual branches; attention-probability masks (B, H, T, T))."""
    return ([m for m in result["masks"] if m.ndim == 3], [m for m in result["masks"] if m.ndim == 4])


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool((a != b).any())


def assert_equals_single_process(results: list[dict]) -> None:
    """One process applying the tp ranks' masks, assembled per token and head, trains like the tp2 run."""
    parallel = results[0]
    calls = list(zip(*(r["masks"] for r in results)))
    reference = train_gpt({}, replay=calls)
    np.testing.assert_allclose(parallel["losses"], reference["losses"], rtol=0, atol=TOLERANCE)
    params = {name: value for r in results for name, value in r["params"].items()}
    assert params.keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        np.testing.assert_allclose(params[name], value, rtol=0, atol=TOLERANCE, err_msg=name)


def test_stream_seeds_follow_the_mesh():
    """Every coordinate but tp changes the stream, tp does not; distinct streams differ in the low 32 bits the CPU
    generator uses; the seed depends on train.seed and on the step."""
    class Mesh:  # a (pp, dp_replicate, dp_shard, tp) = (2, 2, 4, 2) mesh seen from one coordinate
        mesh_dim_names, shape = ("pp", "dp_replicate", "dp_shard", "tp"), (2, 2, 4, 2)

        def __init__(self, coordinate):
            self.coordinate = coordinate

        def get_coordinate(self):
            return list(self.coordinate)

    coordinates = np.ndindex(*Mesh.shape)
    seeds = {c: stream_seed(3, Mesh(c), step=7) for c in coordinates}
    for (pp, rep, shard, tp), seed in seeds.items():
        assert seed == seeds[pp, rep, shard, 0]
    low_bits = {seed % 2**32 for seed in seeds.values()}
    assert len(low_bits) == 2 * 2 * 4
    assert stream_seed(3, None, step=7) == seeds[0, 0, 0, 0] != stream_seed(4, None, step=7)
    assert stream_seed(3, None, step=7) != stream_seed(3, None, step=8)
    # sharded regions: a drawn number mixed with up to 1024 shard indices stays distinct in the low 32 bits
    assert len({_spread(2**63 - 5, index) % 2**32 for index in range(1024)}) == 1024
    assert _SPREAD % 2 == 1


def test_before_replicated_residual_diverged(two_process):
    """The finding that motivated parallel/random.py: DTensor dropout with per-rank seeds under tp2 without SP
    leaves different values in a `Replicate()` residual stream; with it, they are equal and no random op reaches
    DTensor's RNG path (the probe counts: 1 embedding + 2 per block, per micro-batch and step)."""
    before, after = run(two_process, "before tp2"), run(two_process, "tp2")
    assert [r["dtensor_random_ops"] for r in before] == [(1 + 2 * 4) * 2 * STEPS] * 2
    assert differ(before[0]["first_block_output"], before[1]["first_block_output"])
    assert [r["dtensor_random_ops"] for r in after] == [0, 0]
    np.testing.assert_array_equal(after[0]["first_block_output"], after[1]["first_block_output"])


def test_dp2_replicas_draw_different_masks(two_process):
    ranks = run(two_process, "dp2")
    assert all(differ(a, b) for a, b in zip(ranks[0]["masks"], ranks[1]["masks"]))
    assert len(ranks[0]["masks"]) == (1 + 3 * 4) * 2 * STEPS  # per micro-batch: embedding, 3 per block


def test_tp2_replicated_masks_agree_head_masks_differ(two_process):
    ranks = run(two_process, "tp2")
    (residual0, heads0), (residual1, heads1) = masks_by_kind(ranks[0]), masks_by_kind(ranks[1])
    assert len(residual0) == (1 + 2 * 4) * 2 * STEPS and len(heads0) == 4 * 2 * STEPS
    for a, b in zip(residual0, residual1):
        np.testing.assert_array_equal(a, b)
    assert all(a.shape == (4, 2, 16, 16) and differ(a, b) for a, b in zip(heads0, heads1))
    assert [r["dtensor_random_ops"] for r in ranks] == [0, 0]
    assert_equals_single_process(ranks)


def test_tp2_sp_sequence_shards_draw_different_masks(two_process):
    ranks = run(two_process, "tp2-sp")
    (residual0, heads0), (residual1, heads1) = masks_by_kind(ranks[0]), masks_by_kind(ranks[1])
    assert all(a.shape == (4, 8, 32) and differ(a, b) for a, b in zip(residual0, residual1))
    assert all(differ(a, b) for a, b in zip(heads0, heads1))
    assert [r["dtensor_random_ops"] for r in ranks] == [0, 0]
    assert_equals_single_process(ranks)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_replays_masks_under_tp2_sp(two_process, mode):
    """Recomputation draws again only masks the forward drew (the same set of masks as without it), and the losses
    and parameters are bitwise those without recomputation."""
    plain, recomputed = run(two_process, "tp2-sp"), run(two_process, f"tp2-sp {mode}")
    for rank in range(2):
        assert len(recomputed[rank]["masks"]) > len(plain[rank]["masks"])  # the recomputed forwards drew too
        drawn = {m.tobytes() for m in plain[rank]["masks"]}
        assert {m.tobytes() for m in recomputed[rank]["masks"]} == drawn
        assert recomputed[rank]["losses"] == plain[rank]["losses"]
        for name, value in plain[rank]["params"].items():
            np.testing.assert_array_equal(recomputed[rank]["params"][name], value, err_msg=name)


def test_pp2_trains(two_process):
    ranks = run(two_process, "pp2")
    assert ranks[0]["losses"] == ranks[1]["losses"] and all(math.isfinite(x) for x in ranks[0]["losses"])
    # forwards: 2 micro-batches per step, and the schedule's metadata inference before the first (under fork_rng);
    # stage 0 also drops the embeddings
    forwards = 2 * STEPS + 1
    assert [len(r["masks"]) for r in ranks] == [(1 + 3 * 2) * forwards, 3 * 2 * forwards]
    assert [r["dtensor_random_ops"] for r in ranks] == [0, 0]


def four_process_runs() -> dict:
    # without SP, so that the tp ranks' residual masks must agree; one step: every rule shows in it
    return {"pp2-tp2": train_gpt({"pp": 2, **TP2}, steps=1), "dp2-tp2": train_gpt({"dp": 2, **TP2}, steps=1)}


def test_four_processes_pp2_tp2_and_dp2_tp2():
    """pp2·tp2 with dropout finishes (run_distributed's timeout is the hang guard), tp ranks of a stage agree on
    the residual masks, and under dp2·tp2 replicas draw different masks while each replica's tp ranks agree."""
    results = run_distributed(four_process_runs, 4, timeout=300)
    for name in ("pp2-tp2", "dp2-tp2"):
        ranks = [r[name] for r in results]
        assert [r["dtensor_random_ops"] for r in ranks] == [0] * 4
        assert all(r["losses"] == ranks[0]["losses"] and all(map(math.isfinite, r["losses"])) for r in ranks)
        by_coordinate = {(r["coordinates"]["pp"], r["coordinates"]["dp"], r["coordinates"]["tp"]): r for r in ranks}
        for (pp, dp, tp), r in by_coordinate.items():
            if tp == 1:  # the same stage and replica: replicated masks equal, head masks not
                (residual, heads), (residual0, heads0) = masks_by_kind(r), masks_by_kind(by_coordinate[pp, dp, 0])
                assert len(residual) == len(residual0) > 0
                for a, b in zip(residual, residual0):
                    np.testing.assert_array_equal(a, b)
                assert all(differ(a, b) for a, b in zip(heads, heads0))
    replicas = [masks_by_kind(r["dp2-tp2"])[0] for r in results if r["dp2-tp2"]["coordinates"]["tp"] == 0]
    assert all(differ(a, b) for a, b in zip(*replicas))


def train_synthetic(run_dir: str, parallel: dict, **train_overrides) -> dict:
    """pretrain.train's own run of the gpt preset (synthetic data) under `parallel`, its masks recorded."""
    tree = {"model": GPT, "parallel": parallel, "data": {"path": "synthetic"}, "optim": {"warmup_steps": 1},
            "train": {"steps": 2, "global_batch": 4, "micro_batch": 2, "eval_interval": 0, "run_dir": run_dir,
                      **train_overrides},
            "checkpoint": {"interval": 0, "save_at_end": False},
            "log": {"interval": 1, "progress": False, "tensorboard": False}}
    masks = []
    with recording_dropout(masks):
        losses = train(build_config({}, tree))
    return {"losses": losses, "masks": masks}


def assert_tp_rules(ranks: list[dict], n_micro_steps: int) -> None:
    """Both tp ranks (no SP) drew equal residual masks and different head masks, n_micro_steps forwards' worth."""
    (residual0, heads0), (residual1, heads1) = masks_by_kind(ranks[0]), masks_by_kind(ranks[1])
    assert len(residual0) == (1 + 2 * 4) * n_micro_steps and len(heads0) == 4 * n_micro_steps
    for a, b in zip(residual0, residual1):
        np.testing.assert_array_equal(a, b)
    assert all(differ(a, b) for a, b in zip(heads0, heads1))


def test_training_loop_seeds_the_streams(two_process):
    """The training loop's seeding: its tp ranks draw equal residual masks and different head masks."""
    ranks = run(two_process, "training loop tp2")
    assert len(ranks[0]["losses"]) == 2 and all(map(math.isfinite, ranks[0]["losses"]))
    assert_tp_rules(ranks, n_micro_steps=2 * 2)


def test_resumed_under_another_layout_keeps_the_rules(two_process):
    """A dp2 checkpoint (each rank's generator states its own) resumed as tp2: the tp ranks still agree on the
    replicated masks, since each step seeds its own streams."""
    assert [len(r["losses"]) for r in run(two_process, "saved as dp2")] == [1, 1]
    ranks = run(two_process, "resumed as tp2")
    assert len(ranks[0]["losses"]) == 1 and math.isfinite(ranks[0]["losses"][0])
    assert_tp_rules(ranks, n_micro_steps=2)
