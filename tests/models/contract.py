"""What every architecture's model must honour, written once: the tests in this folder call these with their own
configurations and keep only what is specific to an architecture.

`build(defaults, **overrides)` makes a config and a model (seeded); `assert_causal`, `assert_labels_match_logits`,
`assert_gradients_reach_every_parameter`, `assert_meta_build_equals_eager`, `assert_head_shards_sum_to_whole`,
`assert_rejected` and `assert_loss_falls` (on `stdlib_bytes()`) check one property each; `closed_form_hidden`
and `closed_form_norm` are closed-form pieces of the parameter counts, written independently of the model code.
"""

from __future__ import annotations

import copy
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, ModelConfig, build_config
from pretrain.models import build_model

BYTE_VOCAB = 257  # bytes 0..255 and an end-of-document id 256


def model_config(defaults: dict, **overrides) -> ModelConfig:
    return build_config({}, {"model": {**defaults, **overrides}}).model


def build(defaults: dict, **overrides):
    """(config, model) for the defaults with overrides, the model built right after torch.manual_seed(0)."""
    cfg = model_config(defaults, **overrides)
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


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def closed_form_hidden(m: ModelConfig) -> int:
    """The MLP width: d · mlp_ratio rounded up to a multiple of mlp_multiple_of."""
    return m.mlp_multiple_of * math.ceil(round(m.d_model * m.mlp_ratio, 6) / m.mlp_multiple_of)


def closed_form_norm(m: ModelConfig) -> int:
    """Parameters of one norm: a scale, and a shift for a LayerNorm with biases."""
    return m.d_model * (2 if m.norm == "layernorm" and m.bias else 1)


def assert_causal(model, vocab: int, T: int, cuts=(0, 13, 30), atol: float = 1e-5):
    """Logits are (2, T, vocab); changing the tokens after position t leaves the logits up to t alone (to atol)
    and changes those after it."""
    tokens = torch.randint(0, vocab, (2, T))
    logits = model(tokens)
    assert logits.shape == (2, T, vocab)
    for t in cuts:
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, vocab, changed[:, t + 1:].shape)
        new = model(changed)
        torch.testing.assert_close(new[:, :t + 1], logits[:, :t + 1], rtol=0, atol=atol)
        assert not torch.allclose(new[:, t + 1:], logits[:, t + 1:])


def assert_labels_match_logits(model, vocab: int, T: int = 32, ignored=(1, 7)):
    """model(tokens, labels=…) is the cross-entropy of model(tokens)'s logits, the first ignored[1] labels of row
    ignored[0] being -100 (ignored positions: padding, document starts)."""
    tokens, labels = torch.randint(0, vocab, (2, T)), torch.randint(0, vocab, (2, T))
    row, n = ignored
    labels[row, :n] = -100
    expected = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(tokens, labels=labels), expected)


def assert_gradients_reach_every_parameter(model, vocab: int, T: int = 32, nonzero: bool = True):
    """One next-token loss's backward gives every parameter a finite gradient (and, with nonzero, not all zero)."""
    tokens = torch.randint(0, vocab, (2, T))
    model(tokens, labels=tokens.roll(-1, 1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if nonzero:
            assert p.grad.abs().sum() > 0, name


def init_with_generator(model, seed: int = 3):
    model.init_weights(generator=torch.Generator().manual_seed(seed))


def assert_meta_build_equals_eager(cfg: ModelConfig, eager, init=init_with_generator):
    """Building on the meta device, materialising and initialising (init(model), deterministic) gives exactly the
    eager model's state after the same init."""
    init(eager)
    with torch.device("meta"):
        lazy = build_model(cfg)
    lazy.to_empty(device="cpu")
    init(lazy)
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(a, b), name


def assert_head_shards_sum_to_whole(layer, whole: torch.Tensor, shard, run, shards=((0, 1), (1, 4))):
    """Tensor parallelism's contract: copies of the layer keeping only heads h0:h1 of each parameter
    (shard(name, p, h0, h1) gives the kept part, or None to keep p whole) give partial outputs
    (run(part, h0, h1)) that sum to the whole layer's output. The default shards are uneven on purpose."""
    total = 0
    for h0, h1 in shards:
        part = copy.deepcopy(layer)
        with torch.no_grad():
            for name, p in part.named_parameters():
                kept = shard(name, p.data, h0, h1)
                if kept is not None:
                    p.data = kept.clone()
        total = total + run(part, h0, h1)
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)


def assert_rejected(arch: str, bad: dict):
    """build_model refuses a config of this architecture with the bad settings."""
    cfg = ModelConfig(**{"arch": arch, "d_model": 64, "n_heads": 4, "pos": "none", **bad})
    with pytest.raises(ConfigError):
        build_model(cfg)


def assert_loss_falls(model, data: torch.Tensor | None = None, steps: int = 50, batch: int = 8, T: int = 32,
                      lr: float = 1e-2, drop: float = 2.0):
    """`steps` AdamW steps on random windows of data (by default `stdlib_bytes()`): the last 5 losses average
    > drop nats below the first."""
    data = stdlib_bytes() if data is None else data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - (T + 1), (batch,), generator=g)
        window = torch.stack([data[s:s + T + 1] for s in starts])  # (batch, T + 1)
        loss = model(window[:, :-1], labels=window[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] - drop, losses
