import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.gla import GatedLinearAttention
from tests.models import contract

VOCAB = contract.BYTE_VOCAB


def make(**model):
    return contract.build({"arch": "gla", "d_model": 64, "n_layers": 2, "n_heads": 4, "pos": "none",
                           "vocab_size": VOCAB, "seq_len": 32}, **model)


def test_causality():
    contract.assert_causal(make()[1], VOCAB, 32)


def test_labels_give_cross_entropy_of_logits():
    contract.assert_labels_match_logits(make()[1], VOCAB)


def closed_form_params(m: ModelConfig) -> int:
    """From the config alone: GLA (keys d/2, values d, rank-16 gate with bias, output RMSNorm of size d/H shared by
    the heads)."""
    d, V, L = m.d_model, m.vocab_size, m.n_layers
    mixer = 2 * d * (d // 2) + 3 * d * d + (d * 16 + 16 * (d // 2) + d // 2) + d // m.n_heads
    mlp = 3 * d * contract.closed_form_hidden(m)
    norm = contract.closed_form_norm(m)
    return V * d * (1 if m.tie_embeddings else 2) + L * (mixer + mlp + 2 * norm) + norm


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True, "n_heads": 2}, {"d_model": 128, "n_layers": 3}])
def test_parameter_count_matches_closed_form(overrides):
    cfg, model = make(**overrides)
    assert contract.n_params(model) == closed_form_params(cfg)


def test_gradients_reach_every_parameter():
    contract.assert_gradients_reach_every_parameter(make()[1], VOCAB)


def test_recurrence_matches_token_by_token_definition():
    """The layer equals the GLA equations run one token at a time (fp64)."""
    cfg, _ = make()
    torch.manual_seed(1)
    layer = GatedLinearAttention(cfg).double()
    with torch.no_grad():
        for p in layer.parameters():  # move the norm scales and gate bias off their defaults too
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 9, cfg.d_model, dtype=torch.float64)
    H, Dk, Dv = cfg.n_heads, cfg.d_model // 2 // cfg.n_heads, cfg.d_model // cfg.n_heads
    W = {name: p.detach() for name, p in layer.named_parameters()}
    S = torch.zeros(2, H, Dk, Dv, dtype=torch.float64)
    outs = []
    for t in range(x.shape[1]):
        xt = x[:, t]  # (B, d)
        q = (xt @ W["q_proj.weight"].T).view(2, H, Dk)
        k = (xt @ W["k_proj.weight"].T).view(2, H, Dk)
        v = (xt @ W["v_proj.weight"].T).view(2, H, Dv)
        gate = xt @ W["gk_proj.down.weight"].T @ W["gk_proj.up.weight"].T + W["gk_proj.up.bias"]
        alpha = torch.sigmoid(gate).pow(1 / 16).view(2, H, Dk)  # log α = logsigmoid(·) / 16
        S = alpha[..., None] * S + k[..., :, None] * v[..., None, :]
        o = torch.einsum("bhk,bhkv->bhv", q, S) / math.sqrt(Dk)
        # o_norm.weight (Dv,) is shared by the heads
        o = o / o.pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt() * W["o_norm.weight"]
        o = o.flatten(1) * F.silu(xt @ W["g_proj.weight"].T)
        outs.append(o @ W["o_proj.weight"].T)
    torch.testing.assert_close(layer(x)[0], torch.stack(outs, 1), rtol=1e-10, atol=1e-10)


def test_heads_shard_from_shapes():
    """Column-sharding the projections by heads (as tensor parallelism does) and summing the row-sharded
    output projection's partial results reproduces the whole layer: head count comes from tensor shapes."""
    cfg, _ = make()
    torch.manual_seed(2)
    layer = GatedLinearAttention(cfg)
    x = torch.randn(2, 20, cfg.d_model)
    Dk, Dv = layer.head_k_dim, layer.head_v_dim

    def shard(name, p, h0, h1):
        key_side = name.startswith(("q_proj", "k_proj", "gk_proj.up"))
        if name.startswith(("q_proj", "k_proj", "gk_proj.up", "v_proj", "g_proj")):
            return p[h0 * Dk:h1 * Dk] if key_side else p[h0 * Dv:h1 * Dv]
        if name == "o_proj.weight":
            return p[:, h0 * Dv:h1 * Dv]
        return None  # the gate's low-rank down-projection acts on the whole input; o_norm's scale is shared

    contract.assert_head_shards_sum_to_whole(layer, layer(x)[0], shard, lambda part, h0, h1: part(x)[0])


def test_meta_build_then_init_equals_eager_build():
    contract.assert_meta_build_equals_eager(*make())


@pytest.mark.parametrize("bad", [{"pos": "rope"}, {"attn_impl": "flex"}, {"n_heads": 64}])
def test_rejects_unsupported_settings(bad):
    contract.assert_rejected("gla", bad)


def test_loss_falls_on_python_sources():
    """50 AdamW steps on byte-level stdlib sources: the last 5 losses average > 2 nats below the first (~3 seen)."""
    contract.assert_loss_falls(make()[1])
