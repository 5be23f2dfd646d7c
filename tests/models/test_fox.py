import copy
import math
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, ModelConfig, build_config
from pretrain.models import build_model
from pretrain.models.fox import ForgettingAttention

VOCAB = 257  # bytes 0..255 and an end-of-document id 256



def make(**model):
    cfg = build_config({}, {"model": {"arch": "fox", "d_model": 64, "n_layers": 2, "n_heads": 4, "pos": "none",
                                      "vocab_size": VOCAB, "seq_len": 32, **model}}).model
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def stdlib_bytes(limit: int = 300_000) -> torch.Tensor:
    """A few hundred KB of real text: the standard library's own sources as byte ids, documents split by 256."""
    ids: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += [*path.read_bytes(), 256]
        if len(ids) >= limit:
            break
    return torch.tensor(ids[:limit])


@pytest.mark.parametrize("pro", [False, True])
def test_causality(pro):
    _, model = make(pro=pro)
    tokens = torch.randint(0, VOCAB, (2, 32))
    logits = model(tokens)
    assert logits.shape == (2, 32, VOCAB)
    for t in (0, 13, 30):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, VOCAB, changed[:, t + 1:].shape)
        new = model(changed)
        torch.testing.assert_close(new[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(new[:, t + 1:], logits[:, t + 1:])


def test_labels_give_cross_entropy_of_logits():
    _, model = make(pro=True)
    tokens, labels = torch.randint(0, VOCAB, (2, 32)), torch.randint(0, VOCAB, (2, 32))
    labels[1, :7] = -100
    expected = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(tokens, labels=labels), expected)


def closed_form_params(m: ModelConfig) -> int:
    """From the config alone: softmax attention plus a forget gate (d·H weights, H biases) per layer."""
    d, V, L, H = m.d_model, m.vocab_size, m.n_layers, m.n_heads
    hidden = m.mlp_multiple_of * math.ceil(round(d * m.mlp_ratio, 6) / m.mlp_multiple_of)
    attn = 4 * d * d + d * H + H
    if m.pro:
        attn += 2 * d * H + 3 * d + d * d  # k/v shift gates, q/k/output norms, output gate
    norm = d * (2 if m.norm == "layernorm" and m.bias else 1)
    return V * d * (1 if m.tie_embeddings else 2) + L * (attn + 3 * d * hidden + 2 * norm) + norm


@pytest.mark.parametrize("overrides", [{}, {"pro": True}, {"pro": True, "mlp_ratio": 7 / 3, "tie_embeddings": True},
                                       {"d_model": 96, "n_heads": 6, "n_layers": 3}])
def test_parameter_count_matches_closed_form(overrides):
    cfg, model = make(**overrides)
    assert sum(p.numel() for p in model.parameters()) == closed_form_params(cfg)


@pytest.mark.parametrize("pro", [False, True])
def test_gradients_reach_every_parameter(pro):
    _, model = make(pro=pro)
    tokens = torch.randint(0, VOCAB, (2, 32))
    model(tokens, labels=tokens.roll(-1, 1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


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
    total = 0
    for h0, h1 in ((0, 1), (1, 4)):  # uneven shards on purpose
        part = copy.deepcopy(layer)
        with torch.no_grad():
            for name, p in part.named_parameters():
                if name.startswith(("fgate_proj", "k_shift_proj", "v_shift_proj")):  # one row per head
                    p.data = p.data[h0:h1].clone()
                elif name == "o_proj.weight":
                    p.data = p.data[:, h0 * D:h1 * D].clone()
                else:  # q/k/v/g projections and the per-head norms: D rows per head
                    p.data = p.data[h0 * D:h1 * D].clone()
        total = total + part(x)[0]
    torch.testing.assert_close(total, layer(x)[0], rtol=1e-5, atol=1e-6)


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
    cfg = ModelConfig(**{"arch": "fox", "d_model": 64, "n_heads": 4, "pos": "none", **bad})
    with pytest.raises(ConfigError):
        build_model(cfg)


def test_meta_build_then_init_equals_eager_build():
    cfg, eager = make(pro=True)
    eager.init_weights(generator=torch.Generator().manual_seed(3))
    with torch.device("meta"):
        lazy = build_model(cfg)
    lazy.to_empty(device="cpu")
    lazy.init_weights(generator=torch.Generator().manual_seed(3))
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(a, b), name


def test_loss_falls_on_python_sources():
    """50 AdamW steps on byte-level stdlib sources: the last 5 losses average > 2 nats below the first (~3 seen)."""
    data = stdlib_bytes()
    _, model = make(pro=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        starts = torch.randint(0, len(data) - 33, (8,), generator=g)
        batch = torch.stack([data[s:s + 33] for s in starts])  # (8, 33)
        loss = model(batch[:, :-1], labels=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0, losses
