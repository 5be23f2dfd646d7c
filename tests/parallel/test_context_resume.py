"""Checkpoints do not depend on cp: a run saved under cp2 resumes on one process (cp1), and that run's checkpoint
resumes under cp2 again, continuing with the losses and parameters of an uninterrupted single-process run
(parameters and optimizer state are FSDP shards over dp_shard × cp, which DCP reshards; the loader state is the
same under every cp)."""

import functools

import numpy as np

from tests.dist import run_distributed
from tests.parallel.layouts import STEPS, TOLERANCE, assert_same_params, train_layouts

ARCHS = ("fox", "rwkv7")  # ring attention with the forget gate and the KV-shift halo; state passing with a carry


def test_resume_cp2_to_cp1_to_cp2(tmp_path):
    reference = train_layouts(ARCHS, {}, documents=True)
    run_dir = str(tmp_path)
    leg = functools.partial(train_layouts, run_dir=run_dir, documents=True)
    losses = {arch: [] for arch in ARCHS}
    first = run_distributed(functools.partial(leg, stop_after=2), 2, ARCHS, {"cp": 2})
    one_process = leg(ARCHS, {}, stop_after=4)  # cp1: the same process layout as the reference
    last = run_distributed(leg, 2, ARCHS, {"cp": 2})
    for results in (first[0], one_process, last[0]):
        for arch in ARCHS:
            losses[arch] += results[arch][0]
    for arch in ARCHS:
        np.testing.assert_allclose(losses[arch], reference[arch][0], rtol=0, atol=TOLERANCE, err_msg=arch)
    assert_same_params(last, reference, ARCHS)
    assert len(losses[ARCHS[0]]) == STEPS
