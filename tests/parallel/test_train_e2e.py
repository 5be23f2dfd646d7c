"""`pretrain.train` end to end under dp2·pp2 (4 processes) on a real corpus: the data split follows the dp
coordinate, the pipeline trains, evaluates and checkpoints (resuming under other layouts: test_reshard.py)."""

import json
import math

from data.prepare import prepare
from pretrain.config import build_config
from pretrain.train import train
from tests.dist import run_distributed


def _train(tree):
    return train(build_config({}, tree))


def test_rwkv7_dp2_pp2(tmp_path):
    prepare(["stdlib"], tmp_path / "data", max_bytes=300_000, quiet=True)
    tree = {
        "model": {"arch": "rwkv7", "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32},
        "parallel": {"dp": 2, "pp": 2},
        "data": {"path": str(tmp_path / "data")},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 6, "global_batch": 8, "micro_batch": 2, "run_dir": str(tmp_path / "run"),
                  "eval_interval": 3, "eval_batches": 2},
        "checkpoint": {"interval": 3},
        "log": {"interval": 3, "progress": False, "tensorboard": False},
    }
    losses = run_distributed(_train, 4, tree)
    assert len(losses[0]) == 2 and all(r == losses[0] for r in losses)  # steps 3 and 6, the same on every rank
    assert losses[0][0] > losses[0][-1]  # it learns
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "step_00000006" / "meta.json").exists()
