import pytest

from pretrain.config import OptimConfig, build_config
from pretrain.models import build_model
from pretrain.optim import lr_at, param_groups


def test_no_decay_on_norms_biases_and_embeddings():
    cfg = build_config({}, {"model": {"preset": "gpt", "d_model": 32, "n_heads": 4, "n_layers": 2,
                                      "tie_embeddings": True}}).model
    model = build_model(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "layers.0.mixer.q_proj.weight" in decayed and "layers.1.mlp.down_proj.weight" in decayed
    assert not any(n.endswith("bias") or "norm" in n or "emb" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_cosine_schedule():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(5, cfg, 110) == pytest.approx(0.5)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # half way: the mean of peak and floor
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd_schedule_holds_then_decays_linearly():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, cfg, 100) == 1.0 and lr_at(80, cfg, 100) == 1.0
    assert lr_at(90, cfg, 100) == pytest.approx(0.5)
    assert lr_at(100, cfg, 100) == pytest.approx(0.0)


def test_constant_schedule():
    cfg = OptimConfig(lr=2.0, warmup_steps=0, schedule="constant")
    assert lr_at(1, cfg, 100) == lr_at(100, cfg, 100) == 2.0
