"""Checkpoints reshard: a run saved under one layout resumes under another and continues with the losses and
parameters of an uninterrupted single-process run (tp2·pp2 → dp4 → tp2·dp2, through the Checkpointer)."""

import functools

import numpy as np

from tests.dist import run_distributed
from tests.parallel.layouts import STEPS, TOLERANCE, assert_same_params, train_layouts

ARCHS = ("rwkv7",)  # the most involved: a carry across stages, head-sharded and replicated parameters
TRAIN = {"micro_batch": 2}


def test_resume_under_other_layouts(tmp_path):
    reference = train_layouts(ARCHS, {}, TRAIN)
    run_dir = str(tmp_path)
    legs = [({"tp": 2, "pp": 2}, 2), ({"dp": 4}, 4), ({"tp": 2, "dp": 2}, STEPS)]
    losses = {arch: [] for arch in ARCHS}
    for parallel, stop_after in legs:
        leg = functools.partial(train_layouts, run_dir=run_dir, stop_after=stop_after)
        results = run_distributed(leg, 4, ARCHS, parallel, TRAIN)
        for arch in ARCHS:
            losses[arch] += results[0][arch][0]
    for arch in ARCHS:
        np.testing.assert_allclose(losses[arch], reference[arch][0], rtol=0, atol=TOLERANCE, err_msg=arch)
    assert_same_params(results, reference, ARCHS)
