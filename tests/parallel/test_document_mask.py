"""Document masking under every layout: training on packed documents with position ids equals one process (losses
and final parameters within 1e-5 over 5 steps), for all four architectures (Transformer and FoX with the Pro block:
KV-shift across a document start must see zeros)."""

import functools
import json

import numpy as np
import pytest

from tests.dist import run_distributed
from tests.parallel.layouts import ARCHS, assert_same_training, train_layouts


@functools.cache
def reference(train_json: str, model_json: str = "{}") -> dict:
    return train_layouts(ARCHS, {}, json.loads(train_json), documents=True, model_overrides=json.loads(model_json))


def check(world: int, parallel: dict, train: dict | None = None, archs=ARCHS, model: dict | None = None) -> None:
    train, model = train or {}, model or {}
    layouts = functools.partial(train_layouts, documents=True, model_overrides=model)
    results = run_distributed(layouts, world, archs, parallel, train)
    assert_same_training(results, reference(json.dumps(train, sort_keys=True), json.dumps(model)), archs)


def test_the_mask_changes_training():
    unmasked = train_layouts(ARCHS, {}, {})
    for arch in ARCHS:
        assert np.abs(np.subtract(unmasked[arch][0], reference("{}")[arch][0])).max() > 1e-4, arch


@pytest.mark.parametrize("parallel, train", [
    pytest.param({"tp": 2}, {}, id="tp2-sequence-parallel"),
    pytest.param({"pp": 2}, {}, id="pp2-1f1b"),
    pytest.param({"pp": 2, "pp_schedule": "interleaved_1f1b"}, {}, id="pp2-interleaved-1f1b"),
    pytest.param({"pp": 2, "pp_schedule": "zero_bubble"}, {}, id="pp2-zero-bubble"),
    pytest.param({"dp": 2}, {"micro_batch": 2}, id="dp2-fsdp"),
])
def test_two_processes(parallel, train):
    check(2, parallel, train)


def test_tp2_with_recompute_and_minisequence_chunks():
    """Selective recompute passes the mask to the recomputed op; mini-sequence chunks cut it with the sequence (RWKV-7's
    channel mix shifts tokens across a chunk's edge)."""
    check(2, {"tp": 2, "recompute": "selective", "recompute_modules": "mlp", "minisequence_chunks": 3})


def test_tp2_learned_positions_follow_the_ids():
    check(2, {"tp": 2}, archs=("transformer",), model={"pos": "learned"})


def test_full_recompute_and_minisequence_chunks_on_one_process():
    """A fully recomputed block replays the mask with its forward; MsT chunks of the LM head and MLPs see it too."""
    results = train_layouts(ARCHS, {"recompute": "full", "minisequence_chunks": 3}, {}, documents=True)
    assert_same_training([results], reference("{}"), ARCHS)
