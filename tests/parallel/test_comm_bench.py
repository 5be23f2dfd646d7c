"""bench/comm.py's analytic volumes are what the layouts really move (payload bytes per collective kind)."""

import pytest

from bench.comm import LAYOUTS, measure
from tests.dist import run_distributed

MODEL = {"d_model": 32, "n_layers": 4, "n_heads": 4, "seq_len": 16, "vocab_size": 64}
TRAIN = {"global_batch": 8, "micro_batch": 2}


@pytest.mark.parametrize("arch, layout", [("transformer", "tp2-sp"), ("rwkv7", "pp2-interleaved"),
                                          ("gla", "dp2-fsdp-keep")])
def test_measured_bytes_match_the_analytic_volumes(arch, layout):
    world, parallel = LAYOUTS[layout]
    rank0 = run_distributed(measure, world, arch, parallel, MODEL, TRAIN)[0]
    measured, analytic = rank0["payload"], rank0["analytic"]
    for kind in ("all_gather", "reduce_scatter", "send", "recv"):
        assert measured.get(kind, 0) == analytic.get(kind, 0), (kind, measured, analytic)
    # all-reduces: the analytic terms plus the gradient norm's scalars
    assert 0 <= measured.get("all_reduce", 0) - analytic.get("all_reduce", 0) <= 64, (measured, analytic)


@pytest.mark.parametrize("arch, layout", [("transformer", "cp2"), ("fox", "cp2"), ("gla", "cp2"), ("rwkv7", "cp2"),
                                          pytest.param("rwkv7", "cp2-full", marks=pytest.mark.slow),
                                          pytest.param("fox", "cp2-full", marks=pytest.mark.slow)])
def test_context_parallel_bytes_match_the_analytic_volumes(arch, layout):
    """Ring attention's K/V and dK/dV hops (FoX: with c and its totals' all-gather; Pro: the KV-shift halos), state
    passing's all-gather of (S_loc, M) and its backward, RWKV-7's token-shift halos and the loss's all-reduce, as
    issued by parallel/context*.py, equal launch.perfmodel.cp_volume; with FSDP over cp the whole step does too."""
    world, parallel = LAYOUTS[layout]
    model = {**MODEL, "pro": arch == "fox"}
    rank0 = run_distributed(measure, world, arch, parallel, model, TRAIN)[0]
    assert rank0["cp"]["measured"] == rank0["cp"]["analytic"], rank0["cp"]
    assert set(rank0["cp"]["measured"]) >= ({"send", "recv"} if arch in ("transformer", "fox") else {"all_gather"})
    measured, analytic = rank0["payload"], rank0["analytic"]
    for kind in ("all_gather", "reduce_scatter", "send", "recv"):
        assert measured.get(kind, 0) == analytic.get(kind, 0), (kind, measured, analytic)
    assert 0 <= measured.get("all_reduce", 0) - analytic.get("all_reduce", 0) <= 64, (measured, analytic)


@pytest.mark.parametrize("mixers", ["rwkv7,gla", "gla*3,rwkv7"], ids=["carried", "after-the-boundary"])
def test_a_hybrid_pipeline_carries_from_its_first_rwkv7_layer(mixers):
    """A hybrid's stages send RWKV-7's carry across the boundaries after its first RWKV-7 layer only."""
    world, parallel = LAYOUTS["pp2-1f1b"]
    rank0 = run_distributed(measure, world, "hybrid", parallel, {**MODEL, "mixers": mixers}, TRAIN)[0]
    measured, analytic = rank0["payload"], rank0["analytic"]
    for kind in ("send", "recv"):
        assert measured.get(kind, 0) == analytic.get(kind, 0), (kind, measured, analytic)


def test_tensor_and_pipeline_volumes_count_a_cp_ranks_own_steps():
    """analytic() gives tp_volume and pp_volume a cp rank's s / cp steps, as launch/perfmodel.py does."""
    from types import SimpleNamespace

    from bench.comm import analytic
    from parallel.mesh import ParallelDims
    from pretrain.config import build_config

    volumes = {}
    for cp in (1, 2):
        cfg = build_config({"model": {"arch": "rwkv7", **MODEL}, "parallel": {"pp": 2, "tp": 2, "cp": cp},
                            "train": TRAIN})
        no_parameters = SimpleNamespace(parts=[])  # the data-parallel terms are not under test here
        volumes[cp] = analytic(cfg, ParallelDims.from_config(cfg, 4 * cp), no_parameters, micro_batches=2)
    assert volumes[2]["send"] == volumes[1]["send"] / 2 and volumes[2]["reduce_scatter"] < volumes[1]["reduce_scatter"]
