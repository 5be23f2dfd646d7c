"""`pretrain.train` end to end under dp2·pp2 (4 processes) on a real corpus: the data split follows the dp
coordinate, the pipeline evaluates and checkpoints, and the run resumes from its checkpoint."""

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
                  "eval_interval": 3, "eval_batches": 2, "exit_after_steps": 3},
        "checkpoint": {"interval": 3},
        "log": {"interval": 3, "progress": False, "tensorboard": False},
    }
    first = run_distributed(_train, 4, tree)
    assert len(first[0]) == 3 and all(r == first[0] for r in first)  # every rank logs the same losses
    tree["train"]["exit_after_steps"] = 0
    second = run_distributed(_train, 4, tree)
    assert len(second[0]) == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert first[0][0] > second[0][-1]  # it learns
