"""Gradient accumulation under FSDP keeps gradients sharded (parallel.fsdp_reduce_every_micro_step, the default):
between micro-steps a rank holds 1/dp of the model's gradients plus at most one FSDP unit, where reducing once per
step holds the whole model's; both ways, and with parameters kept gathered (reshard_after_forward=false), training
equals one process and the collectives move what bench/comm.py's analytic volumes (the performance model's) say."""

from bench.comm import LAYOUTS as COMM_LAYOUTS
from bench.comm import measure
from bench.grad_memory import LAYOUTS, bound, held_gradient_bytes, model_section, sizes
from tests.dist import run_distributed
from tests.parallel.layouts import assert_same_training, train_layouts

MEMORY_MODEL = model_section(d_model=256, layers=4, vocab=1024)  # 15 MB: ~0.3 MB of other allocations stay small
MEMORY_LAYOUTS = ("dp2-fsdp", "dp2-fsdp-once", "dp2-fsdp-keep")
COMM_MODEL = {"d_model": 32, "n_layers": 4, "n_heads": 4, "seq_len": 16, "vocab_size": 64}


def held_and_moved() -> dict:
    """One rank: gradient bytes held between 4 micro-steps per layout, and one step's collectives when reducing once
    (2 micro-steps)."""
    held = {name: held_gradient_bytes(LAYOUTS[name][1], MEMORY_MODEL, 4) for name in MEMORY_LAYOUTS}
    moved = measure("transformer", COMM_LAYOUTS["dp2-fsdp-once"][1], COMM_MODEL,
                    {"global_batch": 8, "micro_batch": 2})
    return {"held": held, "moved": moved}


def test_gradients_stay_sharded_between_micro_steps():
    model_bytes, unit_bytes = sizes(MEMORY_MODEL)
    for rank in run_distributed(held_and_moved, 2):
        held = {name: max(rank["held"][name]["held_bytes"]) for name in MEMORY_LAYOUTS}
        sharded = bound(LAYOUTS["dp2-fsdp"][1], model_bytes=model_bytes, unit_bytes=unit_bytes, dp_shard=2)
        assert held["dp2-fsdp"] <= sharded < 0.8 * model_bytes, (held, model_bytes, unit_bytes)
        # reducing once keeps every gradient whole until the last micro-step: the measurement sees them
        assert model_bytes <= held["dp2-fsdp-once"], (held, model_bytes)
        # kept gathered, the parameters are whole between micro-steps, the gradients still sharded
        assert model_bytes <= held["dp2-fsdp-keep"] <= sharded + model_bytes, (held, model_bytes, unit_bytes)
        moved = rank["moved"]
        for kind in ("all_gather", "reduce_scatter"):
            assert moved["payload"].get(kind, 0) == moved["analytic"].get(kind, 0), (kind, moved)
        assert moved["calls"]["reduce_scatter"] == 5  # once per FSDP unit (4 blocks and the root)


def train_each(archs, layouts: list[dict], train: dict) -> list[dict]:
    return [train_layouts(archs, parallel, train) for parallel in layouts]


def test_every_accumulation_mode_trains_like_one_process():
    """Two micro-steps per rank. Reducing every micro-step with reshard_after_forward on is tests/parallel/
    test_layouts.py's dp2-fsdp; here the other two ways."""
    archs, train = ("transformer", "rwkv7"), {"micro_batch": 2}
    layouts = [{"dp": 2, "fsdp_reduce_every_micro_step": False}, {"dp": 2, "reshard_after_forward": False}]
    reference = train_layouts(archs, {}, train)
    results = run_distributed(train_each, 2, archs, layouts, train)
    for i in range(len(layouts)):
        assert_same_training([rank[i] for rank in results], reference, archs)
