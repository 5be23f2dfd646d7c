"""Document masking (`model(tokens, position_ids=...)`): a row of packed documents gives, per document, the logits and
the parameter gradients of running that document alone. Lengths cross the ops' chunk (32) and sub-chunk (8) sizes;
one row starts inside a document (its ids continue that document's count), the other at a document start."""

import pytest
import torch

from tests.models.contract import build

# row → [(first position id, length), …]; position ids count from 0 at a document's first token
ROWS = [[(5, 13), (0, 40), (0, 27)], [(0, 30), (0, 17), (0, 33)]]
T = 80
VOCAB = 50

VARIANTS = {
    "transformer": {"arch": "transformer"},
    "transformer-pro": {"arch": "transformer", "pro": True},
    "gpt": {"arch": "transformer", "preset": "gpt", "dropout": 0.0},
    "transformer-unfused": {"arch": "transformer", "attn_impl": "unfused"},
    "fox": {"arch": "fox"},
    "fox-pro": {"arch": "fox", "pro": True},
    "gla": {"arch": "gla"},
    "rwkv7": {"arch": "rwkv7"},
}


def packed_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (len(ROWS), T), generator=g)
    position_ids = torch.stack([torch.cat([torch.arange(first, first + n) for first, n in row]) for row in ROWS])
    weights = torch.randn(len(ROWS), T, VOCAB, generator=g, dtype=torch.float64)  # a loss that reaches every logit
    return tokens, position_ids, weights


def pieces():
    """(row, start, stop) of every document piece in the packed rows."""
    for r, row in enumerate(ROWS):
        start = 0
        for _, n in row:
            yield r, start, start + n
            start += n


def fp64_model(name):
    defaults = {"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": VOCAB, "seq_len": T}
    _, model = build(defaults, **VARIANTS[name])
    model = model.double().eval()  # eval: no dropout, so runs compare exactly
    # every parameter perturbed: zero-initialised ones (RWKV-7's output projections) would hide a mixer entirely
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_packed_equals_alone(model) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Each document of `packed_batch()`'s rows gives, packed, the logits and parameter gradients of running it alone
    (fp64, 1e-9 of their scale); returns the tokens, the documents' logits run alone and their scale."""
    tokens, position_ids, weights = packed_batch()

    packed = model(tokens, position_ids=position_ids)  # (B, T, V)
    (packed * weights).sum().backward()
    packed_grads = grads(model)
    model.zero_grad(set_to_none=True)

    alone = torch.empty_like(packed)
    for r, a, b in pieces():
        logits = model(tokens[r:r + 1, a:b], position_ids=position_ids[r:r + 1, a:b])  # (1, n, V)
        (logits * weights[r:r + 1, a:b]).sum().backward()  # gradients accumulate over the documents
        alone[r, a:b] = logits[0].detach()
    scale = float(alone.abs().max())
    torch.testing.assert_close(packed.detach(), alone, rtol=0, atol=1e-9 * scale)
    alone_grads = grads(model)
    assert packed_grads.keys() == alone_grads.keys()
    for n, g in alone_grads.items():
        torch.testing.assert_close(packed_grads[n], g, rtol=0, atol=1e-9 * max(float(g.abs().max()), 1e-3), msg=n)
    return tokens, alone, scale


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_documents_equal_documents_run_alone(name):
    model = fp64_model(name)
    tokens, alone, scale = assert_packed_equals_alone(model)
    # the mask has an effect: without it, later documents see earlier ones
    unmasked = model(tokens).detach()
    assert (unmasked - alone).abs().max() > 1e-4 * scale


def test_rotary_positions_are_relative_to_the_ids():
    """One document with ids 7, 8, … gives the logits of the same tokens at positions 0, 1, … (RoPE is relative)."""
    model = fp64_model("transformer")
    tokens, _, _ = packed_batch()
    plain = model(tokens[:, :20])
    # the angles are computed in fp32 (as everywhere): other absolute positions round differently
    torch.testing.assert_close(model(tokens[:, :20], position_ids=torch.arange(7, 27).expand(2, 20)), plain,
                               rtol=0, atol=1e-6 * float(plain.abs().max()))


def test_learned_positions_follow_the_ids():
    """Ids 5, 6, … read rows 5, 6, … of the learned table: equal to a model whose table is moved up by 5 rows."""
    model = fp64_model("gpt")
    tokens, _, _ = packed_batch()
    moved = fp64_model("gpt")
    with torch.no_grad():
        moved.pos_emb.weight[:-5] = model.pos_emb.weight[5:]
    expected = moved(tokens[:, :13])
    torch.testing.assert_close(model(tokens[:, :13], position_ids=torch.arange(5, 18).expand(2, 13)), expected,
                               rtol=0, atol=1e-9 * float(expected.abs().max()))


def test_learned_positions_past_the_table_share_its_last_row():
    model = fp64_model("gpt")
    tokens = torch.randint(0, VOCAB, (1, 4))
    far = torch.tensor([[T + 10, T + 11, T + 12, T + 13]])  # a window deep inside a long document
    last = torch.full((1, 4), T - 1)
    torch.testing.assert_close(model(tokens, position_ids=far), model(tokens, position_ids=last), rtol=0, atol=0)
