import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import build_config
from pretrain.metrics import GPU_PEAK_BF16, attention_span, flops_per_token, format_duration, matmul_params
from pretrain.models import build_model
from pretrain.ops.gla import CHUNK_SIZE


def _triangular_solve_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """A triangular solve with an [n, n] matrix and m right-hand sides: n² · m FLOPs, half a dense product
    (the convention `flops_per_token` counts RWKV-7's WY solve with; FlopCounterMode has no formula for it)."""
    *batch, n, m = b_shape
    return math.prod(batch) * n * n * m


def training_step_flops_per_token(cfg) -> float:
    """Matmul FLOPs of one forward + backward of `model(tokens, labels=labels)`, per token, as torch counts them."""
    net = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len))
    solve = {torch.ops.aten.linalg_solve_triangular: _triangular_solve_flops}
    with FlopCounterMode(display=False, custom_mapping=solve) as counter:
        net(tokens, labels=tokens).backward()
    return counter.get_total_flops() / tokens.numel()


# Small widths, a narrow MLP and a small vocabulary, so the mixer's own term is a large share of the total
# and a wrong one cannot hide inside the 5% tolerance. seq_len 128 is four of the linear mixers' chunks and,
# for FoX's blockwise path, one query block (block_q = 128): every tile is computed, the full square.
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 64, "mlp_ratio": 1.0, "seq_len": 128,
        "dropout": 0.0}
# attn_impl that train on CPU with matmuls FlopCounterMode sees: it has no formula for CPU flash SDPA, and FoX's
# flex path runs forward-only off CUDA ('unfused' is FoX's blockwise torch path too).
CPU_COUNTABLE = [
    pytest.param({"arch": "transformer", "attn_impl": "unfused"}, id="transformer"),
    pytest.param({"arch": "transformer", "attn_impl": "unfused", "preset": "gpt"}, id="transformer-gpt"),
    pytest.param({"arch": "transformer", "attn_impl": "unfused", "tie_embeddings": True}, id="transformer-tied"),
    pytest.param({"arch": "transformer", "attn_impl": "unfused", "pro": True}, id="transformer-pro"),
    pytest.param({"arch": "fox", "attn_impl": "torch"}, id="fox"),
    pytest.param({"arch": "fox", "attn_impl": "torch", "pro": True}, id="fox-pro"),
    pytest.param({"arch": "gla", "attn_impl": "torch", "n_heads": 1}, id="gla"),  # one head: K = 16, V = 32
    pytest.param({"arch": "rwkv7", "attn_impl": "torch"}, id="rwkv7"),
]


@pytest.mark.parametrize("model", CPU_COUNTABLE)
def test_flops_per_token_matches_torch_flop_counter(model):
    """flops_per_token(cfg) is within 5% of what FlopCounterMode counts for one training step.

    Softmax attention: the unfused path and FoX's blockwise path (one tile here) both compute the full s×s
    square, so the default full-square count is compared. FoX's backward also recomputes QKᵀ (2·s·d per
    layer and token), hardware work that the model-FLOPs count leaves out, so it is added to the expectation.
    Linear mixers: the count is exact but for torch's triangular-solve backward, which forms a dense C×C
    gradient (≈ 1% here). The remaining gap is 6 FLOPs per norm scale and bias, which N includes.
    """
    cfg = build_config({}, {"model": {**TINY, **model}}).model
    counted = training_step_flops_per_token(cfg)
    mixer_recompute = cfg.n_layers * 2 * cfg.seq_len * cfg.d_model if cfg.arch == "fox" else 0
    formula = flops_per_token(cfg)
    assert formula + mixer_recompute == pytest.approx(counted, rel=0.05)

    # The test could not fail on a wrong mixer term if that term were small: dropping it must miss by > 5%,
    mixer_share = 1 - 6 * matmul_params(cfg) / formula
    assert mixer_share > 0.15
    # and so must the likeliest slips: the causal half for softmax attention, a chunk twice too long (fla's 64
    # for GLA) for the linear mixers.
    if cfg.arch in ("transformer", "fox"):
        wrong = flops_per_token(cfg, causal=True)
    else:
        wrong = flops_per_token(cfg, chunk_size=2 * CHUNK_SIZE)
    assert wrong + mixer_recompute != pytest.approx(counted, rel=0.05)


def test_matmul_params_excludes_input_embeddings_only():
    cfg = build_config({}, {"model": {"preset": "gpt", "d_model": 64, "n_heads": 4, "n_layers": 2}}).model
    net = build_model(cfg)
    total = sum(p.numel() for p in net.parameters())
    assert matmul_params(cfg) == total - net.tok_emb.weight.numel() - net.pos_emb.weight.numel()


def test_causal_count_halves_the_attention_term():
    cfg = build_config({}, {"model": {"d_model": 64, "n_heads": 4, "n_layers": 2, "seq_len": 128}}).model
    full, causal = flops_per_token(cfg), flops_per_token(cfg, causal=True)
    assert full - causal == pytest.approx(cfg.n_layers * 6 * cfg.seq_len * cfg.d_model)


def test_peak_table_prefers_specific_names():
    names = [name for name, _ in GPU_PEAK_BF16]
    assert names.index("H100 PCIe") < names.index("H100")
    assert names.index("L40S") < names.index("L40") < names.index("L4")


def test_format_duration():
    assert format_duration(5) == "5s" and format_duration(125) == "2m05s" and format_duration(3700) == "1h01m"
    assert format_duration(float("nan")) == "?"


def test_attention_span_sums_squared_document_lengths():
    # row 0: pieces of 3 and 2 tokens; row 1: a continued piece of 2, then 3 (cut at the row start and at id 0)
    ids = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])
    assert attention_span(ids) == pytest.approx((9 + 4 + 4 + 9) / 10)
    assert attention_span(torch.arange(7, 15).expand(3, 8)) == pytest.approx(8)  # no start: the whole row


def test_document_masked_flops_count_softmax_attention_within_documents():
    cfg = build_config({}, {"model": {"arch": "fox", "d_model": 64, "n_layers": 3, "n_heads": 4, "seq_len": 128}}).model
    assert flops_per_token(cfg, attention_span=128) == flops_per_token(cfg)
    # softmax attention's 12·s·d per layer with s = the span
    assert flops_per_token(cfg, attention_span=40) - flops_per_token(cfg, attention_span=0) == 3 * 12 * 40 * 64
    gla = build_config({}, {"model": {"arch": "gla", "d_model": 64, "n_layers": 3, "n_heads": 4, "seq_len": 128}}).model
    assert flops_per_token(gla, attention_span=40) == flops_per_token(gla)  # chunkwise work does not change
