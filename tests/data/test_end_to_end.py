"""Training on streamed shards: a dp=2 run checkpointed at step k and resumed with dp=1 matches a straight dp=2 run."""

import pytest

from data.prepare import prepare
from pretrain.config import build_config
from pretrain.train import train
from tests.dist import run_distributed

STEPS, STOP = 8, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("stdlib-shards")
    prepare(["stdlib"], out, max_bytes=400_000, val_fraction=0.02, shard_size=60_000, quiet=True)
    return str(out)


def tiny(shards, run_dir, **train_overrides) -> dict:
    return {
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32, "dropout": 0.0},
        "data": {"path": shards, "shuffle_window": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 4, "run_dir": str(run_dir), "eval_interval": 0,
                  "seed": 11, **train_overrides},
        "checkpoint": {"interval": 0, "keep_last": 2},
        "log": {"interval": 1, "progress": False, "tensorboard": False},
    }


def _train(tree) -> list[float]:
    return train(build_config({}, tree))


def test_dp2_checkpoint_resumed_on_dp1_matches_straight_dp2(shards, tmp_path):
    straight = run_distributed(_train, 2, tiny(shards, tmp_path / "straight"))[0]
    first = run_distributed(_train, 2, tiny(shards, tmp_path / "resumed", exit_after_steps=STOP))[0]
    # One process now: the same global batch of 8 is two micro-batches of 4, the data continues at sample 8·STOP.
    second = _train(tiny(shards, tmp_path / "resumed"))
    assert len(straight) == STEPS and len(first) == STOP and len(second) == STEPS - STOP
    assert first == pytest.approx(straight[:STOP], abs=1e-5)
    assert second == pytest.approx(straight[STOP:], abs=1e-5)
