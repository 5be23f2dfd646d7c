import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.rwkv7 import RWKV7, RWKV7ChannelMix, RWKV7TimeMix
from tests.models import contract

VOCAB = contract.BYTE_VOCAB

BASE = {"arch": "rwkv7", "d_model": 64, "n_layers": 2, "n_heads": 4, "pos": "none", "norm": "layernorm", "bias": True,
        "mlp_ratio": 4.0, "vocab_size": VOCAB}


def make(**model):
    return contract.build({**BASE, "seq_len": 32}, **model)


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The module with noise on every parameter, so no zero-initialised weight hides a term."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("trained_like", [False, True])
def test_causality(trained_like):
    _, model = make()
    if trained_like:  # at init every block is the identity (zero output projections): perturb to test the mixers
        perturbed(model, 1)
    contract.assert_causal(model, VOCAB, 32)


def test_labels_give_cross_entropy_of_logits():
    contract.assert_labels_match_logits(make()[1], VOCAB)


def closed_form_params(m: ModelConfig) -> int:
    """From the config alone, with the reference's LoRA widths max(32, round(c·√d / 32)·32)."""
    d, V, L = m.d_model, m.vocab_size, m.n_layers

    def lora(c: float, bias: bool = True) -> int:
        rank = max(32, round(c * math.sqrt(d) / 32) * 32)
        return 2 * d * rank + d * bias

    def time_mix(layer: int) -> int:
        return (4 * d * d  # r, k, v, o
                + 6 * d  # μ_r, μ_w, μ_k, μ_v, μ_a, μ_g
                + lora(2.5) + lora(2.5) + (lora(1.7) if layer > 0 else 0) + lora(5.0, bias=False)  # w, a, v, g
                + 3 * d  # k_k, k_a, r_k
                + 2 * d)  # per-head GroupNorm weight and bias

    channel_mix = d + 2 * d * contract.closed_form_hidden(m)
    norm = contract.closed_form_norm(m)
    blocks = sum(time_mix(layer) + channel_mix + 2 * norm for layer in range(L))
    return V * d * (1 if m.tie_embeddings else 2) + norm + blocks + norm  # embedding norm (ln0), final norm


@pytest.mark.parametrize("overrides", [{}, {"n_layers": 3, "tie_embeddings": True},
                                       {"d_model": 256, "n_heads": 4, "n_layers": 1, "norm": "rmsnorm"},
                                       {"d_model": 1024, "n_heads": 16, "n_layers": 2, "vocab_size": 64}])
def test_parameter_count_matches_closed_form(overrides):
    cfg = contract.model_config(BASE, **overrides)
    with torch.device("meta"):  # counting needs no storage or init (the d=1024 case is a real width)
        model = RWKV7(cfg)
    assert contract.n_params(model) == closed_form_params(cfg)


def test_gradients_reach_every_parameter():
    _, model = make()
    perturbed(model, 1)  # zero-initialised LoRA downs and output projections would block gradients at init
    contract.assert_gradients_reach_every_parameter(model, VOCAB)


def test_gradients_finite_at_init():
    contract.assert_gradients_reach_every_parameter(make()[1], VOCAB, nonzero=False)


def reference_time_mix(layer: RWKV7TimeMix, x: torch.Tensor, v_first: torch.Tensor | None) -> torch.Tensor:
    """RWKV-7's time mix one token at a time, with the state kept as in the reference ([H, V, K] per batch):
    state ← state·diag(e^w) + state·(−κ̂)ᵀ(κ̂⊙a) + vᵀk, out = state·r."""
    P = {name: p.detach() for name, p in layer.named_parameters()}
    B, T, d = x.shape
    N = layer.head_dim
    H = d // N

    def lora(name, inp, act=lambda t: t):
        out = act(inp @ P[f"{name}.down.weight"].T) @ P[f"{name}.up.weight"].T
        return out + P[f"{name}.up.bias"] if f"{name}.up.bias" in P else out

    state = torch.zeros(B, H, N, N, dtype=x.dtype)
    prev = torch.zeros(B, d, dtype=x.dtype)
    outs = []
    for t in range(T):
        xt = x[:, t]
        xx = prev - xt
        prev = xt
        xr, xw, xk, xv, xa, xg = (xt + xx * P[f"mu_{n}"] for n in "rwkvag")
        r = xr @ P["r_proj.weight"].T
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(lora("w_lora", xw, torch.tanh)))  # the decay itself
        k = xk @ P["k_proj.weight"].T
        v = xv @ P["v_proj.weight"].T
        if v_first is not None:
            v = v + (v_first[:, t] - v) * torch.sigmoid(lora("v_lora", xv))
        a = torch.sigmoid(lora("a_lora", xa))
        g = lora("g_lora", xg, torch.sigmoid)
        kk = (k * P["k_k"]).view(B, H, N)
        kk = kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k * (1 + (a - 1) * P["k_a"])
        r, w, k, v, a = (z.view(B, H, N) for z in (r, w, k, v, a))
        vk = v[..., :, None] * k[..., None, :]  # (B, H, V, K)
        ab = (-kk)[..., :, None] * (kk * a)[..., None, :]  # (B, H, K, K)
        state = state * w[..., None, :] + state @ ab + vk
        out = (state @ r[..., None]).squeeze(-1)  # (B, H, V)
        mean, var = out.mean(-1, keepdim=True), out.var(-1, unbiased=False, keepdim=True)
        out = (out - mean) / torch.sqrt(var + 64e-5) * P["o_norm.weight"].view(H, N) + P["o_norm.bias"].view(H, N)
        out = out + (r * k * P["r_k"].view(H, N)).sum(-1, keepdim=True) * v
        outs.append((out.reshape(B, d) * g) @ P["o_proj.weight"].T)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("layer_index", [0, 1])
def test_time_mix_matches_token_by_token_recurrence(layer_index):
    """The layer (chunked op, whole sequence) equals the reference recurrence run token by token, in fp64."""
    cfg, _ = make(n_layers=3)
    layer = RWKV7TimeMix(cfg, layer_index)
    layer.init_weights()
    perturbed(layer.double(), 3)
    x = torch.randn(2, 21, cfg.d_model, dtype=torch.float64)
    v_first = torch.randn(2, 21, cfg.d_model, dtype=torch.float64) if layer_index else None
    y, carry = layer(x, v_first)
    torch.testing.assert_close(y, reference_time_mix(layer, x, v_first), rtol=1e-9, atol=1e-9)
    if layer_index == 0:  # the first layer hands on its values as the carry
        previous = F.pad(x, (0, 0, 1, -1))  # x_{t-1}, zero before the start
        torch.testing.assert_close(carry, layer.v_proj(x + (previous - x) * layer.mu_v))
    else:
        assert carry is v_first
        with pytest.raises(ValueError):
            layer(x, None)


def test_channel_mix_matches_definition():
    cfg, _ = make()
    mix = perturbed(RWKV7ChannelMix(cfg, 1).double(), 4)  # float64: squared activations are large
    x = torch.randn(2, 9, cfg.d_model, dtype=torch.float64)
    prev = torch.cat([torch.zeros(2, 1, cfg.d_model, dtype=torch.float64), x[:, :-1]], 1)
    h = x + (prev - x) * mix.mu_k
    expected = torch.relu(h @ mix.up_proj.weight.T).square() @ mix.down_proj.weight.T
    torch.testing.assert_close(mix(x), expected)


def test_heads_shard_from_shapes():
    """Column-sharding everything per head (projections, LoRA up-projections with their w₀/a₀/v₀ biases, k_k,
    k_a, r_k, the GroupNorm affine, the value-residual carry) and summing the row-sharded o_proj's partial
    results (as tensor parallelism does) reproduces the whole layer."""
    cfg, _ = make()
    layer = RWKV7TimeMix(cfg, 1)
    layer.init_weights()
    perturbed(layer, 5)
    x, v_first = torch.randn(2, 20, cfg.d_model), torch.randn(2, 20, cfg.d_model)
    D = layer.head_dim

    def shard(name, p, h0, h1):
        if name == "o_proj.weight":
            return p[:, h0 * D:h1 * D]
        if name.startswith("mu_") or ".down." in name:  # μ and LoRA downs act on the input
            return None
        return p[h0 * D:h1 * D]

    contract.assert_head_shards_sum_to_whole(layer, layer(x, v_first)[0], shard,
                                    lambda part, h0, h1: part(x, v_first[..., h0 * D:h1 * D])[0])


def test_reference_initialisation():
    """Spot checks of the reference's init: identity blocks, decays between e^{-e^{-1/2}} and 1, first-layer
    ln0, tiny embeddings and an orthogonal head."""
    cfg, model = make(n_layers=4)
    mixer = model.layers["2"].mixer
    assert model.layers["0"].emb_norm is not None and model.layers["1"].emb_norm is None
    assert mixer.o_proj.weight.abs().max() == 0 and model.layers["2"].mlp.down_proj.weight.abs().max() == 0
    assert mixer.w_lora.down.weight.abs().max() == 0 and mixer.w_lora.up.weight.abs().max() > 0
    decay = torch.exp(-math.exp(-0.5) * torch.sigmoid(mixer.w_lora.up.bias))
    assert (decay > math.exp(-math.exp(-0.5))).all() and (decay < 1).all() and decay.max() > 0.99
    torch.testing.assert_close(mixer.o_norm.weight, torch.full((64,), (3 / 4) ** 0.7))
    assert model.tok_emb.weight.abs().max() <= 1e-4
    W = model.lm_head.weight  # (V, d), V > d: orthogonal columns scaled by 0.5·√(V/d)
    torch.testing.assert_close(W.T @ W, torch.eye(64) * 0.25 * VOCAB / 64, rtol=1e-4, atol=1e-4)


def test_meta_build_then_init_equals_eager_build():
    contract.assert_meta_build_equals_eager(*make())


@pytest.mark.parametrize("bad", [{"pos": "rope"}, {"attn_impl": "flex"}])
def test_rejects_unsupported_settings(bad):
    contract.assert_rejected("rwkv7", bad)


def test_loss_falls_on_python_sources():
    """50 AdamW steps on byte-level stdlib sources: the last 5 losses average > 2 nats below the first (~3 seen)."""
    contract.assert_loss_falls(make()[1])
