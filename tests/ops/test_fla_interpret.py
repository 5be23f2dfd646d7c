"""Our fla dispatch with document masking (flattened rows, `cu_seqlens`, per-row initial states mapped to the
pieces and back) equals our torch path: fla-core's Triton kernels run on CPU under Triton's interpreter, in a
fresh process per op (see `tests/ops/fla_interpret.py` for the bridges). Float32, max |error| ≤ 1e-4 ·
max(1, max |reference|), outputs, final states and every input gradient. Slow: 20–50 s per op on 2 cores.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fla")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("op", ["gla", "rwkv7", "forgetting"])
def test_fla_dispatch_with_docs_matches_torch_path(op):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "tests.ops.fla_interpret", op], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
