"""HSDP (parallel.dp_replicate × parallel.dp_shard) on 4 gloo processes, 2 × 2: FSDP shards inside each pair of
consecutive ranks (a node) and replicates across pairs; it trains like one process with either accumulation mode,
its collectives move what the performance model counts, and its checkpoints reshard to plain FSDP (dp4) and back."""

import functools

import numpy as np
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from bench.comm import LAYOUTS as COMM_LAYOUTS
from bench.comm import measure
from parallel.mesh import ParallelDims, data_parallel_mesh
from tests.dist import run_distributed
from tests.parallel.layouts import STEPS, TOLERANCE, assert_same_params, assert_same_training, build, tiny_config, \
    train_layouts

HSDP = {"dp_replicate": 2, "dp_shard": 2}
TRAIN = {"micro_batch": 1}  # 8 sequences over dp = 4: 2 micro-steps, so the replicas' all-reduce waits for the last
ARCHS = ("transformer", "rwkv7")


@functools.cache
def reference(archs) -> dict:
    return train_layouts(archs, {}, TRAIN)


def hsdp_rank() -> dict:
    """One rank: its mesh coordinates and groups, its parameters' layout, training both ways, one step's collectives."""
    cfg = tiny_config("transformer", HSDP, **TRAIN)
    mesh = ParallelDims.from_config(cfg, dist.get_world_size()).build_mesh("cpu")
    groups = {axis: dist.get_process_group_ranks(mesh.get_group(axis)) for axis in ("dp_replicate", "dp_shard", "dp")}
    model, _ = build(cfg, mesh)
    placements = {(p.device_mesh.mesh_dim_names, p.placements) for p in model.parameters()}
    halved = all(2 * p.to_local().shape[0] == p.shape[0] for p in model.parameters() if p.shape[0] % 2 == 0)
    return {"dp_rank": mesh.get_local_rank("dp"), "groups": groups, "placements": placements, "halved": halved,
            "fsdp_mesh": data_parallel_mesh(mesh).mesh_dim_names,
            "trained": [train_layouts(ARCHS, {**HSDP, "fsdp_reduce_every_micro_step": every}, TRAIN)
                        for every in (True, False)],
            "moved": measure("transformer", COMM_LAYOUTS["hsdp-r2s2"][1], {"d_model": 32, "n_layers": 4,
                             "n_heads": 4, "seq_len": 16, "vocab_size": 64}, {"global_batch": 16, "micro_batch": 2})}


def test_hsdp_shards_inside_a_node_and_trains_like_one_process():
    results = run_distributed(hsdp_rank, 4)
    for rank, result in enumerate(results):
        assert result["dp_rank"] == rank  # the loader's rank: replica-major over the flattened axis
        pair = rank // 2 * 2
        assert result["groups"] == {"dp_replicate": [rank % 2, rank % 2 + 2], "dp_shard": [pair, pair + 1],
                                    "dp": [0, 1, 2, 3]}
        assert result["fsdp_mesh"] == ("dp_replicate", "dp_shard")
        # every parameter replicated over the replicas and halved over the shard pair
        assert result["placements"] == {(("dp_replicate", "dp_shard"), (Replicate(), Shard(0)))}
        assert result["halved"]
        moved = result["moved"]  # 2 micro-steps: a reduce-scatter each, then one all-reduce of the shards
        for kind in ("all_gather", "reduce_scatter"):
            assert moved["payload"].get(kind, 0) == moved["analytic"][kind], (kind, moved)
        assert 0 <= moved["payload"].get("all_reduce", 0) - moved["analytic"]["all_reduce"] <= 64, moved
    for trained in zip(*(result["trained"] for result in results)):
        assert_same_training(list(trained), reference(ARCHS), ARCHS)


def test_checkpoints_reshard_between_hsdp_and_fsdp(tmp_path):
    """HSDP saves after step 2, plain FSDP over all 4 resumes and saves after step 4, HSDP finishes: the losses and
    final parameters are an uninterrupted single-process run's."""
    archs = ("rwkv7",)
    legs = [(HSDP, 2), ({"dp": 4}, 4), (HSDP, STEPS)]
    results = run_distributed(train_legs, 4, archs, legs, str(tmp_path))
    losses = results[0][-1]
    expected = reference(ARCHS)
    np.testing.assert_allclose(losses["rwkv7"], expected["rwkv7"][0], rtol=0, atol=TOLERANCE)
    assert_same_params([result[-2] for result in results], expected, archs)


def train_legs(archs, legs, run_dir: str) -> tuple[dict, dict]:
    """One rank: each (parallel, stop_after) leg resumes from the last one's checkpoint; (the last leg's results,
    every leg's losses joined)."""
    losses = {arch: [] for arch in archs}
    for parallel, stop_after in legs:
        leg = train_layouts(archs, parallel, TRAIN, run_dir=run_dir, stop_after=stop_after)
        for arch in archs:
            losses[arch] += leg[arch][0]
    return leg, losses
