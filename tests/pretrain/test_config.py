from pathlib import Path

import pytest

from pretrain.config import ConfigError, build_config, help_text, load_config

REPO = Path(__file__).resolve().parents[2]


def test_typo_in_key_suggests_the_nearest_valid_one():
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'.*Did you mean 'lr'"):
        load_config(["--optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown section \[trian\].*Did you mean 'train'"):
        load_config(["--trian.steps=3"])


def test_typo_in_toml_file_names_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[model]\nd_modle = 64\n")
    with pytest.raises(ConfigError, match=f"d_modle.*{path.name}.*Did you mean 'd_model'"):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("args, message", [
    (["--optim.lr=fast"], "optim.lr='fast' is not a valid float"),
    (["--model.arch=gpa"], "Did you mean 'gla'"),
    (["--model.d_model=100", "--model.n_heads=3"], "not divisible by model.n_heads=3"),
    (["--train.global_batch=10", "--train.micro_batch=4"], "multiple of train.micro_batch"),
    (["--optim.warmup_steps=500", "--train.steps=100"], "warmup_steps=500"),
    (["--model.dropout=1.5"], "dropout must be in"),
    (["--model.tie_embeddings=maybe"], "not a valid bool"),
    (["--train.steps"], "needs a value"),
    (["steps=3"], "--section.key=value"),
])
def test_invalid_values_fail_fast_with_a_fix(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_precedence_defaults_preset_file_cli(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "gpt"\ndropout = 0.2\nd_model = 64\n[optim]\nlr = 1e-4\n')
    cfg = load_config(["--config", str(path), "--optim.lr", "5e-4", "--model.n_heads=8"])
    assert cfg.model.norm == "layernorm"  # from the preset
    assert cfg.model.dropout == 0.2  # the file beats the preset
    assert cfg.optim.lr == 5e-4  # the command line beats the file
    assert cfg.model.n_heads == 8 and cfg.model.d_model == 64
    assert cfg.train.steps == 200  # default


def test_help_lists_every_option_with_its_docstring(capsys):
    text = help_text()
    cfg = build_config()
    for section, values in cfg.to_dict().items():
        for key in values:
            assert f"--{section}.{key} " in text, f"{section}.{key} missing from --help"
    line = next(line for line in text.splitlines() if "--optim.lr " in line)
    assert "Peak learning rate" in line


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(["--config", str(path)])


def test_position_auto_is_resolved_however_the_config_is_made():
    from pretrain.config import ModelConfig
    assert ModelConfig().pos == "rope" and ModelConfig(arch="gla").pos == "none"
    assert build_config({}, {"model": {"arch": "fox"}}).model.pos == "none"
    assert build_config({}, {"model": {"preset": "gpt"}}).model.pos == "learned"
