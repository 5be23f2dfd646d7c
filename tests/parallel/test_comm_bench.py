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
