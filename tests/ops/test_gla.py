"""`pretrain.ops.gla`: equals fla's naive recurrence (outputs and every input gradient), the plain recurrence in
float64, carries state across calls, keeps memory linear in T, and rejects bad input. `gla_step` (one decode
step) equals fla's naive recurrence and the float64 loop step by step from a nonzero state.

Tolerances: float32 vs fla, max |error| ≤ 1e-4 · max(1, max |reference|); float64 vs the loop, 1e-10 (same
scaling); bf16 on GPU vs the float32 torch path, normwise relative error ≤ 2e-2 (outputs) / 5e-2 (grads).
"""

import pytest
import torch
import torch.nn.functional as F

from pretrain.ops.gla import gla, gla_step
from tests.ops.helpers import (assert_grads_rel, assert_matches, assert_near, assert_saved_memory_linear, log_gates,
                               qkv, rel_err)

NAMES = ("q", "k", "v", "g", "h0")


def make_inputs(B, T, H, K, V, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(gen, B, T, H, K, V, dtype)
    g = log_gates(gen, (B, T, H, K), dtype)  # one gate per key channel
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, g, h0)]


def loop_gla(q, k, v, g, h0, scale):
    """S_t = Diag(e^{g_t}) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t, one step at a time."""
    S = h0.clone()  # (B, H, K, V)
    out = []
    for t in range(q.shape[1]):
        S = g[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("K,V,chunk_size", [(16, 16, 16), (32, 16, 32), (16, 32, 32)])
def test_matches_fla_naive(T, K, V, chunk_size):
    from fla.ops.gla.naive import naive_recurrent_gla

    q, k, v, g, h0 = make_inputs(2, T, 2, K, V)
    o, ht = gla(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    reference = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert_matches((o, ht), reference, (q, k, v, g, h0), NAMES, 1e-4)


@pytest.mark.parametrize("T,chunk_size", [(37, 16), (130, 32)])
def test_float64_matches_loop(T, chunk_size):
    q, k, v, g, h0 = make_inputs(1, T, 2, 16, 24, dtype=torch.float64, seed=1)
    scale = 0.3
    o, ht = gla(q, k, v, g, scale, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    assert_matches((o, ht), loop_gla(q, k, v, g, h0, scale), (q, k, v, g, h0), NAMES, 1e-10, cotangents="ones")


def test_extreme_decay_is_finite():
    q, k, v, g, _ = make_inputs(1, 64, 1, 16, 16)
    o = gla(q, k, v, torch.full_like(g, -500.0), chunk_size=32)  # state forgets everything every step
    scale = 16 ** -0.5
    expected = scale * (q * k).sum(-1, keepdim=True) * v
    assert torch.isfinite(o).all()
    assert_near(o, expected, 1e-5, "o")


def test_state_carries_across_calls():
    q, k, v, g, h0 = make_inputs(2, 100, 2, 16, 32, seed=2)
    o, ht = gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o1, h1 = gla(q[:, :45], k[:, :45], v[:, :45], g[:, :45], initial_state=h0, output_final_state=True)
    o2, h2 = gla(q[:, 45:], k[:, 45:], v[:, 45:], g[:, 45:], initial_state=h1, output_final_state=True)
    assert_near(torch.cat((o1, o2), 1), o, 1e-5, "o")
    assert_near(h2, ht, 1e-5, "final state")


def test_returns_output_alone_by_default():
    q, k, v, g, _ = make_inputs(1, 5, 1, 16, 16)
    o = gla(q, k, v, g)
    assert isinstance(o, torch.Tensor) and o.shape == v.shape and o.dtype == q.dtype


def test_saved_memory_is_linear_in_T():
    def call_at(T):
        q, k, v, g, _ = make_inputs(1, T, 1, 16, 16)
        return lambda: gla(q, k, v, g)

    assert_saved_memory_linear(call_at)


@pytest.mark.parametrize("bad", ["ndim", "k_shape", "g_shape", "v_heads", "state", "impl", "fla_on_cpu", "chunk"])
def test_bad_input_raises(bad):
    q, k, v, g, h0 = (x.detach() for x in make_inputs(1, 8, 2, 16, 16))
    kwargs = {}
    if bad == "ndim":
        q = q[0]
    elif bad == "k_shape":
        k = k[..., :8]
    elif bad == "g_shape":
        g = g[:, :4]
    elif bad == "v_heads":
        v = v[:, :, :1]
    elif bad == "state":
        kwargs["initial_state"] = h0[:, :1]
    elif bad == "impl":
        kwargs["impl"] = "triton"
    elif bad == "fla_on_cpu":
        kwargs["impl"] = "fla"
    else:
        kwargs["chunk_size"] = 20
    with pytest.raises(ValueError):
        gla(q, k, v, g, **kwargs)


@pytest.mark.gpu
def test_fla_kernel_matches_torch_path_bf16():
    pytest.importorskip("fla")
    q, k, v, g, h0 = (x.detach().cuda() for x in make_inputs(2, 300, 4, 64, 128, seed=3))
    g = F.logsigmoid(torch.randn_like(g)) / 16  # GLA's gate range: fla's kernel is exact there
    ref_in = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o_ref, ht_ref = gla(*ref_in[:4], initial_state=ref_in[4], output_final_state=True, impl="torch")
    bf = [x.bfloat16().requires_grad_() for x in (q, k, v, g)]
    h0_bf = h0.clone().requires_grad_()
    o, ht = gla(*bf, initial_state=h0_bf, output_final_state=True, impl="fla")
    assert o.dtype == torch.bfloat16
    assert rel_err(o, o_ref) <= 2e-2 and rel_err(ht, ht_ref) <= 2e-2
    assert_grads_rel((o, ht), [*bf, h0_bf], (o_ref, ht_ref), ref_in, NAMES, [torch.randn_like(o_ref), None])


def test_step_matches_fla_naive_one_step_at_a_time():
    """From a nonzero state, each step's output, new state and the gradients of both (w.r.t. q, k, v, g and the
    state entering the step) equal fla's naive recurrence run for that one step (which computes in float32)."""
    from fla.ops.gla.naive import naive_recurrent_gla

    q, k, v, g, h0 = (x.detach() for x in make_inputs(2, 6, 2, 16, 32, seed=4))
    S = h0
    for t in range(q.shape[1]):
        inputs = [x[:, t:t + 1].clone().requires_grad_() for x in (q, k, v, g)] + [S.clone().requires_grad_()]
        o, S_next = gla_step(*inputs[:4], initial_state=inputs[4])
        assert o.shape == (2, 1, 2, 32) and S_next.shape == h0.shape
        reference = naive_recurrent_gla(*inputs[:4], initial_state=inputs[4], output_final_state=True)
        assert_matches((o, S_next), reference, inputs, NAMES, 1e-6)
        S = S_next.detach()


def test_step_float64_matches_loop():
    """Stepping through a sequence in float64 gives the recurrence loop's outputs and final state to 1e-12, with a
    scale other than the default."""
    q, k, v, g, h0 = (x.detach() for x in make_inputs(2, 20, 2, 16, 24, dtype=torch.float64, seed=5))
    scale = 0.3
    S, outputs = h0, []
    for t in range(q.shape[1]):
        o, S = gla_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], scale, initial_state=S)
        outputs.append(o)
    assert S.dtype == torch.float64
    o_loop, S_loop = loop_gla(q, k, v, g, h0, scale)
    assert_near(torch.cat(outputs, 1), o_loop, 1e-12, "o")
    assert_near(S, S_loop, 1e-12, "final state")


def test_step_without_a_state_starts_from_zero_and_keeps_a_float32_state():
    q, k, v, g, _ = (x.detach() for x in make_inputs(2, 1, 2, 16, 16, seed=6))
    o, S = gla_step(q, k, v, g)
    o_chunked, S_chunked = gla(q, k, v, g, output_final_state=True)
    assert_near(o, o_chunked, 1e-6, "o")
    assert_near(S, S_chunked, 1e-6, "state")
    o_bf16, S_bf16 = gla_step(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16(), initial_state=S)
    assert o_bf16.dtype == torch.bfloat16 and S_bf16.dtype == torch.float32


@pytest.mark.parametrize("bad,message", [
    ("two_steps", r"got q \[1, 2, 2, 16\]"), ("k_shape", r"k \[1, 1, 2, 8\]"), ("v_heads", r"v \[1, 1, 1, 16\]"),
    ("state", r"initial_state must be .* got \[1, 1, 16, 16\]"), ("fla_on_cpu", "needs CUDA tensors")])
def test_step_bad_input_raises(bad, message):
    q, k, v, g, h0 = (x.detach() for x in make_inputs(1, 2, 2, 16, 16))
    q, k, v, g = (x[:, :1] for x in (q, k, v, g))
    kwargs = {}
    if bad == "two_steps":
        q, k, v, g = (torch.cat((x, x), 1) for x in (q, k, v, g))
    elif bad == "k_shape":
        k = k[..., :8]
    elif bad == "v_heads":
        v = v[:, :, :1]
    elif bad == "state":
        h0 = h0[:, :1]
    else:
        kwargs["impl"] = "fla"
    with pytest.raises(ValueError, match=message):
        gla_step(q, k, v, g, initial_state=h0, **kwargs)


@pytest.mark.gpu
def test_fla_step_matches_torch_step_bf16():
    pytest.importorskip("fla")
    q, k, v, g, h0 = (x.detach().cuda() for x in make_inputs(2, 1, 4, 64, 128, seed=7))
    g = F.logsigmoid(torch.randn_like(g)) / 16  # GLA's gate range
    o_ref, S_ref = gla_step(q, k, v, g, initial_state=h0, impl="torch")
    o, S = gla_step(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16(), initial_state=h0, impl="fla")
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert rel_err(o, o_ref) <= 2e-2 and rel_err(S, S_ref) <= 2e-2
