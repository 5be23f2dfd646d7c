import contextlib

import pytest
import torch

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


def rwkv7_model(**model):
    cfg = build_config({}, {"model": {"arch": "rwkv7", "d_model": 64, "n_heads": 2, "n_layers": 2, "vocab_size": 64,
                                      "seq_len": 16, "norm": "layernorm", "bias": True,
                                      "mlp_ratio": 4.0, **model}})
    return cfg, build_model(cfg.model)


def group_names(model, groups) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def test_rwkv7_reference_groups_follow_blinkdl():
    """BlinkDL's configure_optimizers: 2× lr on w₀ (no decay); decay on matrices but the LoRAs' (w1, w2, a1, …),
    embedding and head included; everything else (vectors, LoRA matrices, a₀, v₀, norms) at 1× without decay."""
    cfg, model = rwkv7_model()
    decay, no_decay, w0 = param_groups(model, 0.1, rwkv7_reference=True)
    decayed, plain, doubled = group_names(model, (decay, no_decay, w0))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "lr_scale" not in decay and "lr_scale" not in no_decay  # 1: older checkpoints' groups lack the key
    assert (w0["weight_decay"], w0["lr_scale"]) == (0.0, 2.0)
    assert doubled == {"layers.0.mixer.w_lora.up.bias", "layers.1.mixer.w_lora.up.bias"}
    assert decayed == {"tok_emb.weight", "lm_head.weight"} | {
        f"layers.{i}.{m}.weight" for i in range(2)
        for m in ("mixer.r_proj", "mixer.k_proj", "mixer.v_proj", "mixer.o_proj", "mlp.up_proj", "mlp.down_proj")}
    assert {"layers.1.mixer.w_lora.down.weight", "layers.1.mixer.g_lora.up.weight", "layers.1.mixer.a_lora.up.bias",
            "layers.1.mixer.v_lora.up.bias", "layers.0.mixer.mu_r", "layers.0.mixer.k_k", "layers.0.mixer.r_k",
            "layers.0.mixer.o_norm.weight", "layers.0.emb_norm.weight", "layers.1.mlp.mu_k", "norm.bias"} <= plain
    assert len(decayed) + len(plain) + len(doubled) == len(list(model.parameters()))


def test_rwkv7_reference_groups_are_the_default_and_switchable():
    from pretrain.optim import build_optimizer
    cfg, model = rwkv7_model()
    scales = [g.get("lr_scale", 1.0) for g in build_optimizer(model, cfg.optim, torch.device("cpu")).param_groups]
    assert scales == [1.0, 1.0, 2.0]
    cfg.optim.rwkv7_reference_groups = False
    assert len(build_optimizer(model, cfg.optim, torch.device("cpu")).param_groups) == 2


def test_lr_scale_survives_the_training_steps_lr():
    """train_step sets each group's lr from the schedule times the group's lr_scale: w₀ trains at 2×."""
    from parallel.parallelize import ParallelModel
    from pretrain.optim import build_optimizer
    from pretrain.train import train_step
    cfg, model = rwkv7_model()
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    w0 = model.layers["1"].mixer.w_lora.up.bias
    before = w0.detach().clone()
    train_step(ParallelModel(parts=[model]), [optimizer], [(tokens[:, :-1], tokens[:, 1:])], lr=0.25, grad_clip=0.0,
               autocast=contextlib.nullcontext())
    lrs = {g.get("lr_scale", 1.0): g["lr"] for g in optimizer.param_groups}
    assert lrs == {1.0: 0.25, 2.0: 0.5}
    # Adam's first step moves each entry by lr · sign(g) (bias-corrected, no decay on w₀): 2 × 0.25
    moved = (w0.detach() - before).abs()
    assert torch.allclose(moved[moved > 0], torch.tensor(0.5), rtol=1e-3)


def test_hybrid_rwkv7_layers_get_blinkdl_groups_and_the_rest_the_shared_rule():
    """'rwkv7*3,transformer': layers 0-2 follow BlinkDL's recipe, layer 3 and the shared embedding / head the
    shared rule (embedding undecayed, untied head decayed)."""
    cfg = build_config({}, {"model": {"arch": "hybrid", "mixers": "rwkv7*3,transformer", "d_model": 64,
                                      "n_heads": 2, "n_layers": 4, "vocab_size": 64, "seq_len": 16,
                                      "tie_embeddings": False}})
    model = build_model(cfg.model)
    groups = param_groups(model, 0.1, rwkv7_reference=True)
    decayed, plain, doubled = group_names(model, groups)
    assert groups[2]["lr_scale"] == 2.0
    assert doubled == {f"layers.{i}.mixer.w_lora.up.bias" for i in range(3)}
    assert {"layers.2.mixer.r_proj.weight", "layers.0.mlp.up_proj.weight", "layers.3.mixer.q_proj.weight",
            "layers.3.mlp.down_proj.weight", "lm_head.weight"} <= decayed
    assert {"layers.1.mixer.w_lora.down.weight", "layers.2.mixer.a_lora.up.weight", "layers.0.mixer.k_k",
            "tok_emb.weight", "norm.weight"} <= plain
    assert not any(n.startswith("layers.3.") and "lora" in n for n in decayed | plain | doubled)
    assert len(decayed) + len(plain) + len(doubled) == len(list(model.parameters()))
    # the whole-model recipe applies only when every layer is RWKV-7: the pure model decays its embedding
    _, pure = rwkv7_model()
    pure_decayed = group_names(pure, param_groups(pure, 0.1, rwkv7_reference=True))[0]
    assert "tok_emb.weight" in pure_decayed


def test_hybrid_without_rwkv7_layers_has_two_groups():
    from pretrain.optim import build_optimizer
    cfg = build_config({}, {"model": {"arch": "hybrid", "mixers": "gla,transformer", "d_model": 32, "n_heads": 2,
                                      "n_layers": 2, "vocab_size": 64, "seq_len": 16}})
    model = build_model(cfg.model)
    assert len(build_optimizer(model, cfg.optim, torch.device("cpu")).param_groups) == 2
