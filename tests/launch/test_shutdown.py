"""The end of a run: ranks tear down in a fixed order (barrier, destroy, rank 0 last) and leave without the
interpreter's teardown, where gloo threads of process groups that torch keeps alive could abort the process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from launch import bootstrap
from tests.dist import run_distributed

REPO = Path(__file__).resolve().parents[2]
LATE_S = 2.0


def _finish_with_rank1_slow_to_destroy() -> tuple[float, float]:
    """(when this rank's process groups were destroyed, when its shutdown returned)."""
    destroy, destroyed = dist.destroy_process_group, []

    def slow_destroy():
        if dist.get_rank() == 1:
            time.sleep(LATE_S)  # e.g. a loaded machine
        destroy()
        destroyed.append(time.time())

    dist.destroy_process_group = slow_destroy
    try:
        bootstrap.shutdown(finished=True)
    finally:
        dist.destroy_process_group = destroy
    return destroyed[0], time.time()


def test_after_a_finished_run_rank0_leaves_last():
    (_, rank0_left), (rank1_destroyed, _) = run_distributed(_finish_with_rank1_slow_to_destroy, 2, fresh=True)
    assert rank0_left >= rank1_destroyed, "rank 0 (the store's host under srun/mpirun) left before rank 1 was done"


def test_end_process_runs_exit_handlers_and_skips_the_interpreter_teardown(tmp_path):
    script = tmp_path / "leave.py"
    script.write_text(textwrap.dedent("""\
        import atexit
        from launch.bootstrap import end_process

        class Teardown:
            def __del__(self):
                print("teardown ran", flush=True)

        kept = Teardown()  # a module global: only the interpreter's teardown would finalize it
        atexit.register(print, "atexit ran")
        print("buffered output", end="")  # stdout is a pipe here, so this waits in Python's buffer
        end_process(3)
        """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 3, out.stderr
    assert out.stdout.startswith("buffered output") and "atexit ran" in out.stdout, out.stdout
    assert "teardown ran" not in out.stdout


@pytest.mark.slow
def test_short_two_process_runs_under_load_exit_cleanly(tmp_path):
    """The issue's reproduction, scaled down: one-step dp2 runs that save at the end, both cores kept busy.
    Before the fix, about 1 in 10 such runs died at exit (`terminate called without an active exception`)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PRETRAIN_LAUNCHER")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    try:
        for i in range(6):
            run_dir = tmp_path / f"run{i}"
            out = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "pretrain.train", "--config", "configs/transformer-tiny.toml", "--data.path=synthetic",
                 "--train.steps=1", "--optim.warmup_steps=0", "--train.eval_interval=0",
                 "--checkpoint.save_at_end=true", "--log.tensorboard=false", f"--train.run_dir={run_dir}"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env, timeout=600)
            assert out.returncode == 0 and "terminate called" not in out.stdout, f"run {i}:\n{out.stdout}"
            assert (run_dir / "checkpoints" / "step_00000001").is_dir()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
