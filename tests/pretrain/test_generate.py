"""Generation: the inference cache continues a sequence exactly as the full-sequence forward computes it, and
`python -m pretrain.generate` decodes with it (greedy = recomputing the whole prefix each token; seeded sampling)."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import build_config
from pretrain.models import build_model
from pretrain.models.common import InferenceCache

TINY = dict(d_model=32, n_layers=3, n_heads=2, vocab_size=61, seq_len=64, mlp_multiple_of=8)
ARCHS = {
    "transformer": dict(arch="transformer"),
    "transformer_pro": dict(arch="transformer", pro=True),
    "gpt": dict(preset="gpt"),
    "fox": dict(arch="fox"),
    "fox_pro": dict(arch="fox", pro=True),
    "gla": dict(arch="gla"),
    "rwkv7": dict(arch="rwkv7"),
}


def perturbed_model(overrides: dict) -> torch.nn.Module:
    """A tiny fp64 model in eval mode with every parameter moved off its initial value (zero-initialised output
    projections, unit norm scales and LoRA biases would otherwise hide terms the cache must carry)."""
    cfg = build_config({}, {"model": {**TINY, **overrides}}).model
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


@pytest.mark.parametrize("pieces", [[5] + [1] * 19, [7, 1, 3, 9]], ids=["prefill_then_tokens", "uneven"])
@pytest.mark.parametrize("name", ARCHS)
@torch.no_grad()
def test_cache_continues_the_full_forward(name, pieces):
    model = perturbed_model(ARCHS[name])
    tokens = torch.randint(0, TINY["vocab_size"], (2, sum(pieces)), generator=torch.Generator().manual_seed(2))
    full = model(tokens)  # (B, T, V)
    cache, outputs, start = InferenceCache(), [], 0
    for n in pieces:
        outputs.append(model(tokens[:, start:start + n], cache=cache))
        start += n
    assert cache.steps == tokens.shape[1]
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=0, atol=1e-9)


@torch.no_grad()
def test_a_cache_that_drops_a_term_is_caught():
    """The check above can fail: forgetting the token shift's last step (RWKV-7) changes the continued logits."""
    model = perturbed_model(ARCHS["rwkv7"])
    tokens = torch.randint(0, TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(3))
    full = model(tokens)
    cache = InferenceCache()
    model(tokens[:, :4], cache=cache)
    for layer in cache.layers.values():
        del layer.tensors["time_shift"]
    assert (model(tokens[:, 4:], cache=cache) - full[:, 4:]).abs().max() > 1e-3


def test_cache_rejects_document_masking_and_learned_positions_past_the_table():
    model = perturbed_model(ARCHS["gpt"])
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="position_ids"):
        model(tokens, position_ids=torch.arange(4)[None], cache=InferenceCache())
    cache = InferenceCache()
    model(torch.zeros(1, TINY["seq_len"] - 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="learned position table"):
        model(tokens, cache=cache)
