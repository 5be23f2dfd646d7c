import math

import pytest
import torch

from pretrain.models.common import apply_rope, mlp_hidden_size, rope_angles
from tests.models import contract

VOCAB = 97


def make(**model):
    return contract.build({"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": VOCAB, "seq_len": 24}, **model)


VARIANTS = {
    "llama": {},
    "gpt": {"preset": "gpt", "dropout": 0.0},
    "pro": {"pro": True},
    "tied": {"tie_embeddings": True, "pos": "none"},
    "layernorm-gelu": {"norm": "layernorm", "mlp": "gelu", "bias": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_causality(variant):
    contract.assert_causal(make(**VARIANTS[variant])[1], VOCAB, 24, cuts=(0, 7, 22), atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_give_cross_entropy_of_logits(variant):
    contract.assert_labels_match_logits(make(**VARIANTS[variant])[1], VOCAB, 24, ignored=(0, 5))


@pytest.mark.parametrize("pro", [False, True])
def test_unfused_attention_equals_sdpa(pro):
    _, sdpa = make(attn_impl="sdpa", pro=pro)
    _, unfused = make(attn_impl="unfused", pro=pro)
    unfused.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 24))
    loss_a, loss_b = sdpa(tokens, labels=tokens), unfused(tokens, labels=tokens)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    loss_a.backward()
    loss_b.backward()
    for (name, a), b in zip(sdpa.named_parameters(), unfused.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def closed_form_params(m) -> int:
    """Parameter count from the config alone, written independently of the model code."""
    d, V, L = m.d_model, m.vocab_size, m.n_layers
    H = m.n_heads
    bias = m.bias
    norm = contract.closed_form_norm(m)
    hidden = contract.closed_form_hidden(m)
    mlp = (3 * d * hidden + (2 * hidden + d) * bias) if m.mlp == "swiglu" else (2 * d * hidden + (hidden + d) * bias)
    attn = 4 * d * d + 4 * d * bias
    if m.pro:
        attn += 2 * d * H + 3 * d + d * d  # k/v shift gates, q/k/output norms, output gate
    embed = V * d + (m.seq_len * d if m.pos == "learned" else 0)
    head = 0 if m.tie_embeddings else V * d
    return embed + L * (attn + mlp + 2 * norm) + norm + head


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count_matches_closed_form(variant):
    cfg, model = make(**VARIANTS[variant])
    assert contract.n_params(model) == closed_form_params(cfg)


def test_gpt_preset_mirrors_korthikanti_gpt():
    cfg, _ = make(preset="gpt")
    assert (cfg.norm, cfg.mlp, cfg.pos, cfg.attn_impl, cfg.bias) == ("layernorm", "gelu", "learned", "unfused", True)
    assert mlp_hidden_size(cfg) == 4 * cfg.d_model and cfg.dropout > 0


def test_dropout_active_in_training_only():
    _, model = make(preset="gpt", dropout=0.5)
    tokens = torch.randint(0, VOCAB, (2, 24))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rope_angles(64, 16, 10000.0, "cpu")

    def score(i, j):
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_meta_build_then_init_equals_eager_build():
    cfg, eager = make(pro=True)

    def init(model):
        torch.manual_seed(0)
        model.init_weights()

    contract.assert_meta_build_equals_eager(cfg, eager, init)


def test_residual_projections_get_scaled_init():
    cfg, model = make(d_model=256, n_layers=8)
    o_std = model.layers["0"].mixer.o_proj.weight.std().item()
    q_std = model.layers["0"].mixer.q_proj.weight.std().item()
    assert q_std == pytest.approx(cfg.init_std, rel=0.05)
    assert o_std == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.n_layers), rel=0.05)
