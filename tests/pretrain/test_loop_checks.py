"""The training loop's own checks, made without stopping the device each step: a non-finite step found at the next
logged step or save (never after a checkpoint of its weights), validation at every multiple of train.eval_interval,
and the config checks for the kernels and for how often ranks agree on stops."""

from __future__ import annotations

import json

import pytest

import pretrain.config as config
import pretrain.train as train_module
from data.prepare import prepare
from pretrain.config import ConfigError, build_config, kernel_warning


def _tree(run_dir, **sections) -> dict:
    tree = {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
            "data": {"path": "synthetic"},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "train": {"steps": 8, "global_batch": 2, "micro_batch": 2, "run_dir": str(run_dir), "eval_interval": 0},
            "checkpoint": {"interval": 2, "keep_last": 0},
            "log": {"interval": 5, "progress": False, "tensorboard": False}}
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return tree


def test_a_non_finite_step_is_named_where_found_and_no_checkpoint_follows_it(tmp_path, monkeypatch):
    """Step 3's gradient norm is NaN; the next check is step 4's save (checkpoints every 2 steps; logged every 5)."""
    real_step, steps = train_module.train_step, []

    def step_with_nan_at_3(*args, **kwargs):
        loss, grad_norm = real_step(*args, **kwargs)
        steps.append(len(steps) + 1)
        return loss, grad_norm * float("nan") if len(steps) == 3 else grad_norm

    monkeypatch.setattr(train_module, "train_step", step_with_nan_at_3)
    with pytest.raises(FloatingPointError) as error:
        train_module.train(build_config({}, _tree(tmp_path)))
    assert str(error.value).startswith("non-finite loss/gradient at step 3, found at step 4")
    assert "nothing after the last good checkpoint (step 2) was saved" in str(error.value)
    assert steps == [1, 2, 3, 4]  # found by the save's check, before the save
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002"]


def test_validation_runs_at_every_multiple_of_eval_interval_whatever_the_log_interval(tmp_path):
    prepare(["stdlib"], tmp_path / "data", max_bytes=300_000, quiet=True)
    tree = _tree(tmp_path / "run", data={"path": str(tmp_path / "data")},
                 train={"steps": 7, "eval_interval": 3, "eval_batches": 1}, checkpoint={"interval": 0},
                 log={"interval": 2})
    train_module.train(build_config({}, tree))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 7]  # validation steps are logged steps too
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6, 7]  # and the last step


def test_sync_every_must_be_positive():
    with pytest.raises(ConfigError, match="train.sync_every must be positive"):
        build_config({}, {"train": {"sync_every": 0}})


def test_fla_kernels_without_fla_core(monkeypatch):
    monkeypatch.setattr(config, "fla_available", lambda: False)
    with pytest.raises(ConfigError, match=r"attn_impl='fla' needs fla-core .*pip install -e '\.\[gpu\]'"):
        build_config({}, {"model": {"arch": "gla", "attn_impl": "fla"}})
    gla = build_config({}, {"model": {"arch": "gla"}}).model  # auto: fine, but slow on CUDA; say so there
    assert "pip install -e '.[gpu]'" in kernel_warning(gla, "cuda")
    assert kernel_warning(gla, "cpu") is None  # the PyTorch ops are the CPU path anyway
    assert kernel_warning(build_config({}, {}).model, "cuda") is None  # the Transformer uses SDPA
    monkeypatch.setattr(config, "fla_available", lambda: True)
    assert kernel_warning(gla, "cuda") is None
    assert build_config({}, {"model": {"arch": "gla", "attn_impl": "fla"}}).model.attn_impl == "fla"
