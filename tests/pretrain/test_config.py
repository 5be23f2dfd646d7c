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


@pytest.mark.parametrize("args, message", [
    (["--optim.lr=nan"], r"optim.lr=nan is not a finite number.*default is 0.001"),
    (["--optim.lr=inf"], r"optim.lr=inf is not a finite number"),
    (["--optim.beta1=1"], r"optim.beta1=1.0 must be in \[0, 1\); the default is 0.9"),
    (["--optim.beta2=1.5"], r"optim.beta2=1.5 must be in \[0, 1\)"),
    (["--optim.beta1=-0.1"], r"optim.beta1=-0.1 must be in \[0, 1\)"),
    (["--optim.eps=0"], r"optim.eps must be positive, got 0.0; the default is 1e-08"),
    (["--optim.eps=-1e-8"], r"optim.eps must be positive"),
    (["--train.eval_batches=0"], r"train.eval_batches must be positive, got 0; the default is 4"),
    (["--train.micro_batch=2.7e0"], r"train.micro_batch='2.7e0' must be a whole number, e.g. 2 or 3"),
    (["--train.micro_batch=nan"], r"train.micro_batch='nan' must be a whole number\.$"),
    (["--train.steps=ten"], r"train.steps='ten' is not a valid int"),
    (["--optim.weight_decay=-0.1"], r"optim.weight_decay must be >= 0 \(0 turns it off\), got -0.1"),
    (["--optim.grad_clip=-1"], r"optim.grad_clip must be >= 0 \(0 turns it off\), got -1.0"),
    (["--train.eval_interval=-5"], r"train.eval_interval must be >= 0 \(0 turns it off\), got -5"),
    (["--model.norm_eps=0"], r"model.norm_eps must be positive"),
    (["--model.rope_theta=-1"], r"model.rope_theta must be positive"),
    (["--model.init_std=0"], r"model.init_std must be positive"),
    (["--model.mlp_ratio=nan"], r"model.mlp_ratio=nan is not a finite number"),
    (["--train.exit_after_minutes=nan"], r"train.exit_after_minutes=nan is not a finite number"),
    (["--train.collective_timeout_minutes=inf"], r"train.collective_timeout_minutes=inf is not a finite number"),
    (["--train.seed=-1"], r"train.seed=-1 must be in \[0, 2\^32\)"),
    (["--train.seed=4294967296"], r"train.seed=4294967296 must be in \[0, 2\^32\)"),
])
def test_numbers_out_of_range_are_refused_with_the_valid_range(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_every_float_field_refuses_nan():
    """The finiteness check covers every float field, also ones added later (nan passes `x <= 0` checks)."""
    from pretrain.config import SECTIONS, _field_types, _section_class
    floats = [f"{section}.{name}" for section in SECTIONS
              for name, typ in _field_types(_section_class(section)).items() if typ is float]
    assert "optim.lr" in floats and "model.dropout" in floats
    for key in floats:
        with pytest.raises(ConfigError, match=f"{key}=nan is not a finite number"):
            load_config([f"--{key}=nan"])


def test_int_fields_take_whole_numbers_in_any_spelling_and_refuse_fractions(tmp_path):
    cfg = load_config(["--train.micro_batch=2e0", "--train.global_batch=16.0", "--train.steps= 300 "])
    assert (cfg.train.micro_batch, cfg.train.global_batch, cfg.train.steps) == (2, 16, 300)
    path = tmp_path / "run.toml"
    path.write_text("[train]\nglobal_batch = 32.0\n")
    assert load_config(["--config", str(path)]).train.global_batch == 32
    path.write_text("[train]\nmicro_batch = 2.7\n")
    with pytest.raises(ConfigError, match=r"train.micro_batch=2.7 must be a whole number, e.g. 2 or 3"):
        load_config(["--config", str(path)])
    path.write_text("[optim]\nlr = nan\n")  # TOML spells nan and inf too
    with pytest.raises(ConfigError, match="optim.lr=nan is not a finite number"):
        load_config(["--config", str(path)])


def test_micro_batches_per_step_splits_the_global_batch_over_micro_batches_and_data_parallel_ranks():
    train = load_config(["--train.global_batch=48", "--train.micro_batch=4"]).train
    assert [train.micro_batches_per_step(dp) for dp in (1, 2, 3, 12)] == [12, 6, 4, 1]
