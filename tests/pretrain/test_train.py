"""End-to-end training on a real corpus (this interpreter's standard library, byte-level)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from data.prepare import prepare
from pretrain.config import build_config
from pretrain.train import train
from tests.dist import run_distributed

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("stdlib")
    prepare(["stdlib"], out, max_bytes=1_500_000, quiet=True)
    return str(out)


def tiny(corpus, run_dir, **sections) -> dict:
    """A config tree small enough for a 2-core CI machine; `sections` override per section."""
    tree = {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 64},
        "data": {"path": corpus},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"steps": 20, "global_batch": 8, "micro_batch": 4, "run_dir": str(run_dir),
                  "eval_interval": 0, "seed": 7},
        "checkpoint": {"interval": 0, "keep_last": 2},
        "log": {"interval": 1, "progress": False},
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return tree


def run(tree) -> list[float]:
    return train(build_config({}, tree))


def test_loss_falls_on_real_corpus(corpus, tmp_path):
    losses = run(tiny(corpus, tmp_path, train={"steps": 50}))
    assert len(losses) == 50
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > 5.0  # ≈ ln(257): an untrained byte model
    assert last < first - 2.0, (first, last)


def test_exact_resume_single_process(corpus, tmp_path):
    straight = run(tiny(corpus, tmp_path / "a", model={"dropout": 0.1}))
    first = run(tiny(corpus, tmp_path / "b", model={"dropout": 0.1}, train={"exit_after_steps": 10}))
    assert len(first) == 10
    second = run(tiny(corpus, tmp_path / "b", model={"dropout": 0.1}))
    assert first + second == straight  # bitwise: dropout RNG, data position and AdamW state all restored


def _train_distributed(tree):
    return run(tree)


def test_exact_resume_two_processes(corpus, tmp_path):
    straight = run_distributed(_train_distributed, 2, tiny(corpus, tmp_path / "a", model={"dropout": 0.1}))
    first = run_distributed(_train_distributed, 2,
                            tiny(corpus, tmp_path / "b", model={"dropout": 0.1}, train={"exit_after_steps": 10}))
    second = run_distributed(_train_distributed, 2, tiny(corpus, tmp_path / "b", model={"dropout": 0.1}))
    assert straight[0] == straight[1]  # every rank logs the all-reduced loss
    assert first[0] + second[0] == straight[0]


def test_metrics_jsonl_and_tensorboard_events(corpus, tmp_path):
    run(tiny(corpus, tmp_path, train={"steps": 6, "eval_interval": 3, "eval_batches": 2}, log={"interval": 3}))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_ppl", "tokens_seen"):
        assert key in rows[-1], key
    assert rows[-1]["mfu"] is None  # no known peak on a CPU
    assert rows[-1]["val_ppl"] == pytest.approx(math.exp(rows[-1]["val_loss"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss/train", "optim/lr", "throughput/tokens_per_s", "loss/val"} <= set(scalars)
    assert [e.step for e in events.Scalars("loss/train")] == [3, 6]
    assert events.Scalars("loss/train")[-1].value == pytest.approx(rows[-1]["loss"])


def test_resume_rewrites_metrics_after_the_checkpoint(corpus, tmp_path):
    run(tiny(corpus, tmp_path, train={"steps": 8}, checkpoint={"interval": 4}))
    # Pretend the job died after step 6: drop the checkpoint at 8 so resume starts from step 4.
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")
    (tmp_path / "checkpoints" / "latest").unlink(missing_ok=True)
    run(tiny(corpus, tmp_path, train={"steps": 8}, checkpoint={"interval": 4}))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_nan_loss_stops_with_clear_error_and_saves_nothing(corpus, tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite"):
        run(tiny(corpus, tmp_path, optim={"lr": 1e30, "warmup_steps": 0, "grad_clip": 0.0}))
    assert not list(tmp_path.glob("checkpoints/step_*"))


def test_vocab_smaller_than_data_fails_before_training(corpus, tmp_path):
    with pytest.raises(Exception, match="vocab_size"):
        run(tiny(corpus, tmp_path, model={"vocab_size": 200}))


def test_cli_help_and_config_errors():
    env = {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pretrain.train", "--help"], capture_output=True, text=True,
                         cwd=REPO, env=env)
    assert out.returncode == 0 and "--optim.lr" in out.stdout and "Peak learning rate" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pretrain.train", "--optim.lrr=1"], capture_output=True,
                         text=True, cwd=REPO, env=env)
    assert bad.returncode != 0 and "Did you mean 'lr'" in bad.stderr


def test_exact_resume_with_dataloader_workers_and_dropout(corpus, tmp_path):
    """Starting DataLoader workers must not draw from the generator dropout's per-step streams use."""
    tree = dict(model={"dropout": 0.1}, data={"num_workers": 1}, train={"steps": 6})
    straight = run(tiny(corpus, tmp_path / "a", **tree))
    first = run(tiny(corpus, tmp_path / "b", **{**tree, "train": {"steps": 6, "exit_after_steps": 3}}))
    second = run(tiny(corpus, tmp_path / "b", **tree))
    assert first + second == straight
