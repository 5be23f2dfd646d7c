"""What a user sees when a run fails: known errors (config, layout, data, checkpoint, non-finite loss) as one line
and a non-zero exit, once per job under torchrun and before torchrun's own report; tracebacks for the rest."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.blend import parse_blend
from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError
from pretrain.train import error_kind

REPO = Path(__file__).resolve().parents[2]
RUN = ["--config", "configs/transformer-tiny.toml", "--data.path=synthetic", "--train.eval_interval=0",
       "--train.steps=1", "--optim.warmup_steps=0", "--log.tensorboard=false"]


def _env() -> dict[str, str]:
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PRETRAIN_LAUNCHER")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _raised(fn) -> Exception:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def _module_in_data(tmp_path: Path):
    """A module named like one of data/'s (its frames say data.*), with a deliberate error and a bug."""
    path = tmp_path / "fake.py"
    path.write_text("def deliberate():\n    raise ValueError('shard x is bad')\n\n"
                    "def bug():\n    return int('not a number')\n")
    spec = importlib.util.spec_from_file_location("data.fake_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_kinds(tmp_path):
    assert error_kind(ConfigError("x")) == "config"
    assert error_kind(CheckpointError("x")) == "checkpoint"
    assert error_kind(FloatingPointError("non-finite loss")) == "training"
    assert error_kind(_raised(lambda: parse_blend(""))) == "data"  # a message data/ wrote for users
    fake = _module_in_data(tmp_path)
    assert error_kind(_raised(fake.deliberate)) == "data"
    assert error_kind(_raised(fake.bug)) is None  # a ValueError from a call inside data/ is a bug: traceback
    assert error_kind(_raised(lambda: int("x"))) is None
    assert error_kind(KeyError("x")) is None


def test_data_and_non_finite_errors_are_one_line_without_traceback(tmp_path):
    for extra, expected in (
            ([f"--data.path={tmp_path / 'missing'}"], "data error: "),
            (["--optim.lr=1e30", "--optim.grad_clip=0", "--train.steps=4", f"--train.run_dir={tmp_path / 'run'}"],
             "training error: non-finite loss/gradient at step ")):
        out = subprocess.run([sys.executable, "-m", "pretrain.train", *RUN, *extra], capture_output=True,
                             text=True, cwd=REPO, env=_env(), timeout=300)
        assert out.returncode == 1, out.stderr
        errors = [line for line in out.stderr.splitlines() if not line.startswith(("INFO ", "WARNING "))]
        assert len(errors) == 1 and errors[0].startswith(expected), out.stderr


def test_layout_error_under_torchrun_is_the_first_error_line_and_appears_once(tmp_path):
    """A real torchrun of 2 processes; tp=2 cannot split 3 heads. Every rank hits it after the process group is up."""
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "pretrain.train", *RUN, "--parallel.tp=2", "--model.n_heads=3", "--model.d_model=96",
         f"--train.run_dir={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=_env(), timeout=600)
    message = "config error: model.n_heads=3 is not divisible by parallel.tp=2"
    lines = out.stdout.splitlines()
    assert out.returncode != 0, out.stdout
    ours = [i for i, line in enumerate(lines) if line.startswith(message)]
    assert len(ours) == 1, out.stdout
    first_error = next(i for i, line in enumerate(lines) if "error" in line.lower() or line.startswith("E"))
    assert first_error == ours[0], out.stdout
    assert "Traceback" not in "\n".join(lines[:ours[0]])
    # torchrun's own failure summary names it too, instead of "To enable traceback see: ..."
    assert f"traceback : {message}" in out.stdout
