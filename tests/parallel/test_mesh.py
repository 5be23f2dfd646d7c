"""Impossible layouts fail before any work, with a message that says what to change."""

import pytest

from parallel.mesh import ParallelDims
from parallel.pipeline import split_layers
from pretrain.config import ConfigError, build_config


def config(parallel=None, model=None, train=None):
    return build_config({
        "model": {"d_model": 64, "n_layers": 4, "n_heads": 4, "seq_len": 32, **(model or {})},
        "parallel": parallel or {},
        "train": {"global_batch": 16, "micro_batch": 2, **(train or {})},
    })


def test_dp_fills_the_world_and_the_mesh_is_named():
    dims = ParallelDims.from_config(config({"tp": 2, "pp": 2}), 8)
    assert dims == ParallelDims(dp_shard=2, pp=2, tp=2) and dims.dp == 2 and dims.world_size == 8


@pytest.mark.parametrize("parallel, world, replicate, shard", [
    ({"dp_replicate": 2}, 8, 2, 4),  # dp_shard = dp / dp_replicate
    ({"dp_replicate": 2, "dp_shard": 2, "tp": 2}, 8, 2, 2),
    ({"dp": 4, "dp_shard": 4}, 4, 1, 4),
    ({"dp_shard": 2}, 8, 4, 2),  # dp_replicate = dp / dp_shard: a study's node count sets the replicas
    ({"dp_replicate": 4, "dp_shard": 1}, 4, 4, 1),  # FSDP2's HSDP with one rank per shard group: replication
])
def test_hsdp_splits_dp_into_replicas_of_shards(parallel, world, replicate, shard):
    dims = ParallelDims.from_config(config(parallel, train={"global_batch": 32}), world)
    assert (dims.dp_replicate, dims.dp_shard, dims.dp) == (replicate, shard, replicate * shard)


@pytest.mark.parametrize("parallel, model, train, world, message", [
    ({"tp": 3}, {}, {}, 4, r"tp × pp = 3 × 1 = 3 does not divide the 4 processes"),
    ({"dp": 2, "tp": 2}, {}, {}, 8, r"dp × tp × pp = 2 × 2 × 1 = 4 but 8 processes"),
    ({"tp": 8}, {}, {}, 8, r"model.n_heads=4 is not divisible by parallel.tp=8"),
    ({"tp": 2}, {"seq_len": 31}, {}, 2, r"seq_len=31 is not divisible by parallel.tp=2.*sequence_parallel=false"),
    ({"tp": 2}, {"mlp_multiple_of": 1, "mlp_ratio": 65 / 64}, {}, 2, r"feed-forward width 65"),
    ({"pp": 3}, {}, {"global_batch": 18}, 3, r"n_layers=4 does not split evenly into pp × virtual_stages = 3"),
    ({"pp": 2, "pp_schedule": "interleaved_1f1b", "virtual_stages": 4}, {}, {}, 2, r"into pp × virtual_stages = 8"),
    ({"pp": 2, "pp_layers": "1,2"}, {}, {}, 2, r"pp_layers='1,2' must give 2 stages .* 4 \(model.n_layers\)"),
    ({"pp": 2, "virtual_stages": 2}, {}, {}, 2, r"'1f1b' runs one stage per process"),
    ({"pp": 2}, {}, {"global_batch": 6}, 2, r"3 micro-batches per step, not a multiple of parallel.pp=2"),
    ({"pp": 2}, {"tie_embeddings": True}, {}, 2, r"untie them"),
    ({"pp": 2}, {}, {"eval_interval": 10, "eval_batches": 3}, 2, r"eval_batches=3 must be a multiple"),
    ({"virtual_stages": 2}, {}, {}, 1, r"need parallel.pp > 1"),
    ({"dp_replicate": 3}, {}, {"global_batch": 12}, 4, r"dp_replicate=3 does not divide the data-parallel degree"),
    ({"dp_shard": 3}, {}, {"global_batch": 12}, 4, r"dp_shard=3 does not divide the data-parallel degree dp = 4"),
    ({"dp_replicate": 2, "dp_shard": 4}, {}, {}, 4, r"2 × 4 = 8 but the data-parallel degree is dp = 4.* start 8"),
    ({"dp_replicate": 2, "data_parallel": "ddp"}, {}, {}, 4, r"HSDP .* needs parallel.data_parallel='fsdp'"),
    ({"dp_shard": 2, "data_parallel": "ddp"}, {}, {}, 4, r"dp_replicate = 2 asks for HSDP"),
])
def test_impossible_layouts(parallel, model, train, world, message):
    with pytest.raises(ConfigError, match=message):
        ParallelDims.from_config(config(parallel, model, train), world)


@pytest.mark.parametrize("parallel, message", [
    ({"data_parallel": "zero3"}, r"parallel.data_parallel='zero3' is not one of"),
    ({"pp_schedule": "gpipe"}, r"parallel.pp_schedule='gpipe' is not one of"),
    ({"tp": 0}, r"parallel.tp and parallel.pp must be >= 1"),
    ({"pp_layers": "2;2"}, r"block counts separated by commas"),
    ({"dp_replicate": -1}, r"parallel.dp, parallel.dp_replicate, parallel.dp_shard .* >= 0"),
    ({"dp": 4, "dp_replicate": 2, "dp_shard": 4}, r"2 × 4 = 8 but parallel.dp=4"),
])
def test_config_rejects_bad_parallel_fields(parallel, message):
    with pytest.raises(ConfigError, match=message):
        config(parallel)


def test_uneven_stages_by_configuration():
    assert split_layers(6, 2, "2,4") == [range(0, 2), range(2, 6)]
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
