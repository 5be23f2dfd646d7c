import warnings

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.models import build_model
from pretrain.models.fox import ForgettingAttention
from tests.models import contract

VOCAB = contract.BYTE_VOCAB


def make(**model):
    return contract.build({"arch": "fox", "d_model": 64, "n_layers": 2, "n_heads": 4, "pos": "none",
                           "vocab_size": VOCAB, "seq_len": 32}, **model)


@pytest.mark.parametrize("pro", [False, True])
def test_causality(pro):
    contract.assert_causal(make(pro=pro)[1], VOCAB, 32)


def test_labels_give_cross_entropy_of_logits():
    contract.assert_labels_match_logits(make(pro=True)[1], VOCAB)


def closed_form_params(m: ModelConfig) -> int:
    """From the config alone: softmax attention plus a forget gate (d·H weights, H biases) per layer."""
    d, V, L, H = m.d_model, m.vocab_size, m.n_layers, m.n_heads
    hidden = contract.closed_form_hidden(m)
    attn = 4 * d * d + d * H + H
    if m.pro:
        attn += 2 * d * H + 3 * d + d * d  # k/v shift gates, q/k/output norms, output gate
    norm = contract.closed_form_norm(m)
    return V * d * (1 if m.tie_embeddings else 2) + L * (attn + 3 * d * hidden + 2 * norm) + norm


@pytest.mark.parametrize("overrides", [{}, {"pro": True}, {"pro": True, "mlp_ratio": 7 / 3, "tie_embeddings": True},
                                       {"d_model": 96, "n_heads": 6, "n_layers": 3}])
def test_parameter_count_matches_closed_form(overrides):
    cfg, model = make(**overrides)
    assert contract.n_params(model) == closed_form_params(cfg)


@pytest.mark.parametrize("pro", [False, True])
def test_gradients_reach_every_parameter(pro):
    contract.assert_gradients_reach_every_parameter(make(pro=pro)[1], VOCAB)


@pytest.mark.parametrize("pro", [False, True])
def test_open_forget_gate_equals_transformer_without_positions(pro):
    """With every forget gate pushed to 1 (bias → +∞) FoX is exactly softmax attention: it must equal the
    Transformer (pos='none', its own SDPA kernel) carrying the same weights; at bias 0 it must not."""
    cfg, fox = make(pro=pro)
    transformer = build_model(ModelConfig(**{**vars(cfg), "arch": "transformer", "attn_impl": "sdpa"}))
    weights = {k: v for k, v in fox.state_dict().items() if ".fgate_proj." not in k}
    transformer.load_state_dict(weights)  # strict: every other parameter is shared
    tokens = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        for block in fox.layers.values():
            block.mixer.fgate_proj.bias.fill_(1e4)  # log σ(1e4 + w·x) = 0 in fp32, whatever w·x is
        torch.testing.assert_close(fox(tokens), transformer(tokens), rtol=1e-5, atol=1e-5)
        for block in fox.layers.values():
            block.mixer.fgate_proj.bias.zero_()
        assert (fox(tokens) - transformer(tokens)).abs().max() > 1e-2


def test_heads_shard_from_shapes():
    """Column-sharding q/k/v/gates/norms by heads and summing the row-sharded o_proj's partial results (as
    tensor parallelism does) reproduces the whole Pro layer: the head count comes from tensor shapes."""
    cfg, _ = make(pro=True)
    torch.manual_seed(2)
    layer = ForgettingAttention(cfg)
    x = torch.randn(2, 20, cfg.d_model)
    D = layer.head_dim

    def shard(name, p, h0, h1):
        if name.startswith(("fgate_proj", "k_shift_proj", "v_shift_proj")):  # one row per head
            return p[h0:h1]
        if name == "o_proj.weight":
            return p[:, h0 * D:h1 * D]
        return p[h0 * D:h1 * D]  # q/k/v/g projections and the per-head norms: D rows per head

    contract.assert_head_shards_sum_to_whole(layer, layer(x)[0], shard, lambda part, h0, h1: part(x)[0])


def test_kernel_choices_agree():
    """attn_impl maps onto the op: unfused → its torch path; flex (forward-only on CPU) gives the same logits."""
    _, reference = make(pro=True, attn_impl="torch")
    tokens = torch.randint(0, VOCAB, (2, 32))
    for impl, op_impl in (("unfused", "torch"), ("flex", "flex"), ("auto", "auto")):
        _, model = make(pro=True, attn_impl=impl)
        assert model.layers["0"].mixer.impl == op_impl
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled on CPU
            torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [{"pos": "rope"}, {"attn_impl": "sdpa"}])
def test_rejects_unsupported_settings(bad):
    contract.assert_rejected("fox", bad)


def test_meta_build_then_init_equals_eager_build():
    contract.assert_meta_build_equals_eager(*make(pro=True))


def test_loss_falls_on_python_sources():
    """50 AdamW steps on byte-level stdlib sources: the last 5 losses average > 2 nats below the first (~3 seen)."""
    contract.assert_loss_falls(make(pro=True)[1])
