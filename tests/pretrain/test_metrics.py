import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import build_config
from pretrain.metrics import GPU_PEAK_BF16, flops_per_token, format_duration, matmul_params
from pretrain.models import build_model


@pytest.mark.parametrize("model", [{}, {"preset": "gpt"}, {"tie_embeddings": True}, {"pro": True}])
def test_transformer_flops_match_torch_flop_counter(model):
    """6N + 12·L·s·h counts the full s×s attention square, as the unfused path's matmuls do.

    (FlopCounterMode has no formula for the CPU flash-attention kernel, so the unfused path is measured.)
    """
    cfg = build_config({}, {"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 128,
                                      "dropout": 0.0, **model, "attn_impl": "unfused"}}).model
    net = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with FlopCounterMode(display=False) as counter:
        net(tokens, labels=tokens).backward()
    measured = counter.get_total_flops() / tokens.numel()
    assert flops_per_token(cfg) == pytest.approx(measured, rel=0.05)


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
