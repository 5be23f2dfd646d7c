"""`pretrain.ops.forgetting`: equals fla's `naive_forgetting_attn` (outputs and every input gradient), a per-query
loop in float64, gives the whole-sequence result when a sequence is fed in pieces with `past`, keeps saved
memory linear in T, and rejects bad input. The FlexAttention backend is checked forward-only on CPU (PyTorch
has no flex backward there).

Tolerances: float32 vs fla, max |error| ≤ 1e-4 · max(1, max |reference|); float64 vs the loop, 1e-10 (same
scaling); bf16 on GPU vs the float32 torch path, normwise relative error ≤ 2e-2 (outputs) / 5e-2 (grads).
"""

import pytest
import torch
import torch.nn.functional as F

from pretrain.ops.forgetting import forgetting_attention
from tests.ops.helpers import (assert_grads_rel, assert_matches, assert_near, assert_saved_memory_linear, log_gates,
                               qkv, rel_err)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
NAMES = ("q", "k", "v", "log_f")


def make_inputs(B, T, H, D, Dv, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(gen, B, T, H, D, Dv, dtype)
    log_f = log_gates(gen, (B, T, H), dtype)  # one gate per head and step
    return [x.requires_grad_() for x in (q, k, v, log_f)]


def loop_fox(q, k, v, log_f, scale):
    """o_i = Σ_{j≤i} softmax_j(scale · q_i·k_j + c_i − c_j) v_j, one query at a time."""
    c = log_f.cumsum(1)  # (B, T, H)
    out = []
    for i in range(q.shape[1]):
        logits = scale * torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, :i + 1])
        logits = logits + (c[:, i, :, None] - c[:, :i + 1].transpose(1, 2))
        out.append(torch.einsum("bhj,bjhd->bhd", logits.softmax(-1), v[:, :i + 1]))
    return torch.stack(out, 1)


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("D,Dv,blocks", [(16, 16, {}), (32, 32, {"block_q": 16, "block_k": 32}),
                                         (16, 32, {"block_q": 32, "block_k": 16})])
def test_matches_fla_naive(T, D, Dv, blocks):
    from fla.ops.forgetting_attn.naive import naive_forgetting_attn

    inputs = make_inputs(2, T, 2, D, Dv)
    o = forgetting_attention(*inputs, **blocks)
    assert_matches([o], [naive_forgetting_attn(*inputs)], inputs, NAMES, 1e-4)


@pytest.mark.parametrize("T,blocks", [(37, {"block_q": 8, "block_k": 16}), (130, {})])
def test_float64_matches_loop(T, blocks):
    inputs = make_inputs(1, T, 2, 16, 24, dtype=torch.float64, seed=1)
    o = forgetting_attention(*inputs, 0.3, **blocks)
    assert_matches([o], [loop_fox(*inputs, 0.3)], inputs, NAMES, 1e-10)


def test_pieces_with_past_equal_whole():
    q, k, v, log_f = make_inputs(2, 100, 2, 16, 32, dtype=torch.float64, seed=2)
    o = forgetting_attention(q, k, v, log_f)
    past, pieces = None, []
    for a, b in ((0, 45), (45, 46), (46, 100)):  # includes a single-step "decode" call
        o_i, past = forgetting_attention(q[:, a:b], k[:, a:b], v[:, a:b], log_f[:, a:b], past=past,
                                         output_past=True, block_q=16, block_k=32)
        pieces.append(o_i)
    for x, whole in zip(past, (k, v, log_f)):
        assert torch.equal(x, whole)
    # the same output, and gradients flow into the past's tensors as they would in the whole sequence
    assert_matches([torch.cat(pieces, 1)], [o], (q, k, v, log_f), NAMES, 1e-12)


def test_flex_forward_matches_torch_path():
    q, k, v, log_f = (x.detach() for x in make_inputs(2, 70, 2, 16, 32, seed=3))
    o = forgetting_attention(q, k, v, log_f, impl="torch")
    assert_near(forgetting_attention(q, k, v, log_f, impl="flex"), o, 1e-4, "flex")
    _, past = forgetting_attention(q[:, :30], k[:, :30], v[:, :30], log_f[:, :30], output_past=True)
    o2 = forgetting_attention(q[:, 30:], k[:, 30:], v[:, 30:], log_f[:, 30:], past=past, impl="flex")
    assert_near(o2, o[:, 30:], 1e-4, "flex with past")


def test_saved_memory_is_linear_in_T():
    def call_at(T):
        inputs = make_inputs(1, T, 1, 16, 16)
        return lambda: forgetting_attention(*inputs)

    assert_saved_memory_linear(call_at)


@pytest.mark.parametrize("bad", ["ndim", "k_shape", "v_time", "log_f_shape", "past_shape", "past_type", "impl",
                                 "fla_on_cpu", "block"])
def test_bad_input_raises(bad):
    q, k, v, log_f = (x.detach() for x in make_inputs(1, 8, 2, 16, 16))
    kwargs = {}
    if bad == "ndim":
        q = q[0]
    elif bad == "k_shape":
        k = k[..., :8]
    elif bad == "v_time":
        v = v[:, :4]
    elif bad == "log_f_shape":
        log_f = log_f[..., None]
    elif bad == "past_shape":
        kwargs["past"] = (k, v[:, :4], log_f)
    elif bad == "past_type":
        kwargs["past"] = (k, v)
    elif bad == "impl":
        kwargs["impl"] = "sdpa"
    elif bad == "fla_on_cpu":
        kwargs["impl"] = "fla"
    else:
        kwargs["block_q"] = 0
    with pytest.raises(ValueError):
        forgetting_attention(q, k, v, log_f, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fla", "flex"])
def test_gpu_backend_matches_torch_path_bf16(impl):
    if impl == "fla":
        pytest.importorskip("fla")
    inputs = [x.detach().cuda() for x in make_inputs(2, 300, 4, 64, 64, seed=4)]
    inputs[3] = F.logsigmoid(torch.randn_like(inputs[3]) + 2)  # forget gates near 1, as FoX initialises them
    ref_in = [x.clone().requires_grad_() for x in inputs]
    o_ref = forgetting_attention(*ref_in, impl="torch")
    # q, k, v in bf16; the gate stays float32 as the FoX layer computes it
    low = [x.bfloat16().requires_grad_() for x in inputs[:3]] + [inputs[3].clone().requires_grad_()]
    o = forgetting_attention(*low, impl=impl)
    assert rel_err(o, o_ref) <= 2e-2
    assert_grads_rel([o], low, [o_ref], ref_in, NAMES, [torch.randn_like(o_ref)])
    # a cached second half gives the second half of the whole
    _, past = forgetting_attention(*(x[:, :120] for x in low), impl=impl, output_past=True)
    o2 = forgetting_attention(*(x[:, 120:] for x in low), past=past, impl=impl)
    assert rel_err(o2, o[:, 120:]) <= 2e-2
