"""`pretrain.ops.rwkv7`: equals fla's `dplr_recurrence` (outputs and every input gradient), the plain recurrence
in float64, carries state across calls, keeps memory linear in T, and rejects bad input. `rwkv7_step` (one decode
step) equals `dplr_recurrence` and the float64 loop step by step from a nonzero state; `rwkv7_kappa_step` is it with
the layer's a = −κ̂, b = κ̂ ⊙ α, and its fla kernel (run by Triton's interpreter on CPU) equals the torch path.

Tolerances: float32 vs fla, max |error| ≤ 1e-4 · max(1, max |reference|); float64 vs the loop, 1e-10 (same
scaling); bf16 on GPU vs the float32 torch path, normwise relative error ≤ 2e-2 (outputs) / 5e-2 (grads).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.ops.rwkv7 import rwkv7, rwkv7_kappa_step, rwkv7_step
from tests.ops.helpers import (assert_grads_rel, assert_matches, assert_near, assert_saved_memory_linear, log_gates,
                               qkv, rel_err)

NAMES = ("r", "w", "k", "v", "a", "b", "h0")
ROOT = Path(__file__).resolve().parents[2]


def make_inputs(B, T, H, K, V, dtype=torch.float32, seed=0, rwkv_ab=True):
    """r, w, k, v, a, b, h0. a = −κ̂, b = κ̂ ⊙ α as in the RWKV-7 layer, or generic small a, b."""
    gen = torch.Generator().manual_seed(seed)
    r, k, v = qkv(gen, B, T, H, K, V, dtype)
    w = log_gates(gen, (B, T, H, K), dtype)  # one decay per key channel
    if rwkv_ab:
        kappa = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
        a, b = -kappa, kappa * torch.rand(B, T, H, K, generator=gen, dtype=dtype)
    else:
        a, b = (0.2 * torch.randn(B, T, H, K, generator=gen, dtype=dtype) for _ in range(2))
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (r, w, k, v, a, b, h0)]


def fla_reference(r, w, k, v, a, b, h0):
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    K = r.shape[-1]
    hf = lambda x: x.transpose(1, 2)  # noqa: E731  [B, T, H, D] ↔ fla's head-first [B, H, T, D]
    # dplr_recurrence scales q by K^-0.5 inside; RWKV-7 uses scale 1
    o, ht = dplr_recurrence(hf(r) * K ** 0.5, hf(k), hf(v), hf(a), hf(b), hf(w), initial_state=h0,
                            output_final_state=True)
    return hf(o), ht


def loop_rwkv7(r, w, k, v, a, b, h0):
    """S_t = Diag(e^{w_t}) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_tᵀ v_t, o_t = r_t S_t, one step at a time."""
    S = h0.clone()  # (B, H, K, V)
    out = []
    for t in range(r.shape[1]):
        u = torch.einsum("bhk,bhkv->bhv", a[:, t], S)
        S = w[:, t].exp()[..., None] * S + b[:, t, ..., None] * u[..., None, :] \
            + k[:, t, ..., None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S))
    return torch.stack(out, 1), S


# fla's reference is slow (a per-step loop with clones), so T and the head sizes vary together, not crossed
@pytest.mark.parametrize("T,K,V,chunk_size,rwkv_ab", [(1, 16, 16, 16, True), (37, 16, 16, 16, True),
                                                      (130, 32, 32, 32, True), (37, 16, 32, 32, False),
                                                      (130, 16, 32, 16, False)])
def test_matches_fla_dplr_recurrence(T, K, V, chunk_size, rwkv_ab):
    inputs = make_inputs(2, T, 2, K, V, rwkv_ab=rwkv_ab)
    o, ht = rwkv7(*inputs[:6], initial_state=inputs[6], output_final_state=True, chunk_size=chunk_size)
    assert_matches((o, ht), fla_reference(*inputs), inputs, NAMES, 1e-4)


@pytest.mark.parametrize("T,chunk_size", [(37, 16), (130, 32)])
def test_float64_matches_loop(T, chunk_size):
    inputs = make_inputs(1, T, 2, 16, 24, dtype=torch.float64, seed=1)
    o, ht = rwkv7(*inputs[:6], initial_state=inputs[6], output_final_state=True, chunk_size=chunk_size)
    assert_matches((o, ht), loop_rwkv7(*inputs), inputs, NAMES, 1e-10, cotangents="ones")


def test_extreme_decay_is_finite():
    r, w, k, v, a, b, h0 = make_inputs(1, 64, 1, 16, 16)
    w = torch.full_like(w, -500.0)  # the diagonal part forgets everything every step
    o = rwkv7(r, w, k, v, a, b, initial_state=h0, chunk_size=32)
    assert torch.isfinite(o).all()
    assert_near(o, loop_rwkv7(r, w, k, v, a, b, h0)[0], 1e-5, "o")


def test_state_carries_across_calls():
    r, w, k, v, a, b, h0 = make_inputs(2, 100, 2, 16, 32, seed=2)
    o, ht = rwkv7(r, w, k, v, a, b, initial_state=h0, output_final_state=True)
    first = [x[:, :45] for x in (r, w, k, v, a, b)]
    second = [x[:, 45:] for x in (r, w, k, v, a, b)]
    o1, h1 = rwkv7(*first, initial_state=h0, output_final_state=True)
    o2, h2 = rwkv7(*second, initial_state=h1, output_final_state=True)
    assert_near(torch.cat((o1, o2), 1), o, 1e-5, "o")
    assert_near(h2, ht, 1e-5, "final state")


def test_returns_output_alone_by_default():
    r, w, k, v, a, b, _ = make_inputs(1, 5, 1, 16, 8)
    o = rwkv7(r, w, k, v, a, b)
    assert isinstance(o, torch.Tensor) and o.shape == v.shape and o.dtype == r.dtype


def test_saved_memory_is_linear_in_T():
    def call_at(T):
        inputs = make_inputs(1, T, 1, 16, 16)
        return lambda: rwkv7(*inputs[:6])

    assert_saved_memory_linear(call_at)


@pytest.mark.parametrize("bad", ["ndim", "w_shape", "b_shape", "v_time", "state", "impl", "fla_on_cpu", "chunk"])
def test_bad_input_raises(bad):
    r, w, k, v, a, b, h0 = (x.detach() for x in make_inputs(1, 8, 2, 16, 16))
    kwargs = {}
    if bad == "ndim":
        r = r[0]
    elif bad == "w_shape":
        w = w[..., :8]
    elif bad == "b_shape":
        b = b[:, :, :1]
    elif bad == "v_time":
        v = v[:, :4]
    elif bad == "state":
        kwargs["initial_state"] = h0.transpose(-1, -2)[..., :8]
    elif bad == "impl":
        kwargs["impl"] = "flex"
    elif bad == "fla_on_cpu":
        kwargs["impl"] = "fla"
    else:
        kwargs["chunk_size"] = 12
    with pytest.raises(ValueError):
        rwkv7(r, w, k, v, a, b, **kwargs)


@pytest.mark.gpu
def test_fla_kernel_matches_torch_path_bf16():
    pytest.importorskip("fla")
    inputs = [x.detach().cuda() for x in make_inputs(2, 300, 4, 64, 64, seed=3)]
    # RWKV-7's decay range, w = −e^{−½}·σ(·) ∈ (−0.61, 0): the range fla's kernel is built for
    inputs[1] = -0.6065 * torch.sigmoid(torch.randn_like(inputs[1]))
    ref_in = [x.clone().requires_grad_() for x in inputs]
    o_ref, ht_ref = rwkv7(*ref_in[:6], initial_state=ref_in[6], output_final_state=True, impl="torch")
    bf = [x.bfloat16().requires_grad_() for x in inputs[:6]]
    h0 = inputs[6].clone().requires_grad_()
    o, ht = rwkv7(*bf, initial_state=h0, output_final_state=True, impl="fla")
    assert o.dtype == torch.bfloat16
    assert rel_err(o, o_ref) <= 2e-2 and rel_err(ht, ht_ref) <= 2e-2
    assert_grads_rel((o, ht), [*bf, h0], (o_ref, ht_ref), ref_in, NAMES, [torch.randn_like(o_ref), None])


@pytest.mark.parametrize("rwkv_ab", [True, False])
def test_step_matches_fla_dplr_recurrence_one_step_at_a_time(rwkv_ab):
    """From a nonzero state, each step's output, new state and the gradients of both (w.r.t. every input and the
    state entering the step) equal fla's `dplr_recurrence` run for that one step (which computes in float32)."""
    r, w, k, v, a, b, h0 = (x.detach() for x in make_inputs(2, 6, 2, 16, 32, seed=4, rwkv_ab=rwkv_ab))
    S = h0
    for t in range(r.shape[1]):
        inputs = [x[:, t:t + 1].clone().requires_grad_() for x in (r, w, k, v, a, b)] + [S.clone().requires_grad_()]
        o, S_next = rwkv7_step(*inputs[:6], initial_state=inputs[6])
        assert o.shape == (2, 1, 2, 32) and S_next.shape == h0.shape
        assert_matches((o, S_next), fla_reference(*inputs), inputs, NAMES, 1e-6)
        S = S_next.detach()


def test_step_float64_matches_loop():
    """Stepping through a sequence in float64 gives the recurrence loop's outputs and final state to 1e-12."""
    r, w, k, v, a, b, h0 = (x.detach() for x in make_inputs(2, 20, 2, 16, 24, dtype=torch.float64, seed=5))
    S, outputs = h0, []
    for t in range(r.shape[1]):
        o, S = rwkv7_step(*(x[:, t:t + 1] for x in (r, w, k, v, a, b)), initial_state=S)
        outputs.append(o)
    assert S.dtype == torch.float64
    o_loop, S_loop = loop_rwkv7(r, w, k, v, a, b, h0)
    assert_near(torch.cat(outputs, 1), o_loop, 1e-12, "o")
    assert_near(S, S_loop, 1e-12, "final state")


def test_step_without_a_state_starts_from_zero_and_keeps_a_float32_state():
    inputs = [x.detach() for x in make_inputs(2, 1, 2, 16, 16, seed=6)[:6]]
    o, S = rwkv7_step(*inputs)
    o_chunked, S_chunked = rwkv7(*inputs, output_final_state=True)
    assert_near(o, o_chunked, 1e-6, "o")
    assert_near(S, S_chunked, 1e-6, "state")
    o_bf16, S_bf16 = rwkv7_step(*(x.bfloat16() for x in inputs), initial_state=S)
    assert o_bf16.dtype == torch.bfloat16 and S_bf16.dtype == torch.float32


@pytest.mark.parametrize("bad,message", [
    ("two_steps", r"got r \[1, 2, 2, 16\]"), ("w_shape", r"w \[1, 1, 2, 8\]"), ("b_shape", r"b \[1, 1, 1, 16\]"),
    ("state", r"initial_state must be .* got \[1, 2, 16, 8\]"), ("fla_on_cpu", "needs CUDA tensors")])
def test_step_bad_input_raises(bad, message):
    *inputs, h0 = (x.detach() for x in make_inputs(1, 2, 2, 16, 16))
    r, w, k, v, a, b = (x[:, :1] for x in inputs)  # one step of the six inputs; the state h0 keeps its shape
    kwargs = {}
    if bad == "two_steps":
        r, w, k, v, a, b = (torch.cat((x, x), 1) for x in (r, w, k, v, a, b))
    elif bad == "w_shape":
        w = w[..., :8]
    elif bad == "b_shape":
        b = b[:, :, :1]
    elif bad == "state":
        h0 = h0.transpose(-1, -2)[..., :8]
    else:
        kwargs["impl"] = "fla"
    with pytest.raises(ValueError, match=message):
        rwkv7_step(r, w, k, v, a, b, initial_state=h0, **kwargs)


@pytest.mark.gpu
def test_fla_step_matches_torch_step_bf16():
    pytest.importorskip("fla")
    inputs = [x.detach().cuda() for x in make_inputs(2, 1, 4, 64, 64, seed=7)]
    inputs[1] = -0.6065 * torch.sigmoid(torch.randn_like(inputs[1]))  # RWKV-7's decay range
    o_ref, S_ref = rwkv7_step(*inputs[:6], initial_state=inputs[6], impl="torch")
    o, S = rwkv7_step(*(x.bfloat16() for x in inputs[:6]), initial_state=inputs[6], impl="fla")
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert rel_err(o, o_ref) <= 2e-2 and rel_err(S, S_ref) <= 2e-2


# --------------------------------------------------------------------------- the step in the layer's terms (κ̂, α)

def kappa_inputs(seed: int, K: int = 16) -> list[torch.Tensor]:
    """r, w, k, v, κ̂, α, h0 for one step (B = 2, H = 2), in RWKV-7's decay range w = −e^{−½}·σ(·)."""
    gen = torch.Generator().manual_seed(seed)
    r, k, v = qkv(gen, 2, 1, 2, K, K, torch.float32)
    w = -0.6065 * torch.sigmoid(torch.randn(2, 1, 2, K, generator=gen))
    kk = F.normalize(torch.randn(2, 1, 2, K, generator=gen), dim=-1)
    alpha = torch.rand(2, 1, 2, K, generator=gen)
    return [r, w, k, v, kk, alpha, torch.randn(2, 2, K, K, generator=gen)]


def test_kappa_step_is_the_step_with_a_and_b_of_the_layer():
    """rwkv7_kappa_step(r, w, k, v, κ̂, α) = rwkv7_step(r, w, k, v, a = −κ̂, b = κ̂ ⊙ α) (DESIGN.md), bitwise."""
    *inputs, h0 = kappa_inputs(8)
    r, w, k, v, kk, alpha = inputs
    o, S = rwkv7_kappa_step(*inputs, initial_state=h0)
    o_ref, S_ref = rwkv7_step(r, w, k, v, -kk, kk * alpha, initial_state=h0)
    assert torch.equal(o, o_ref) and torch.equal(S, S_ref)


@pytest.mark.parametrize("bad,message", [("kk", r"kk and alpha shaped like r .* got kk \[2, 1, 2, 8\]"),
                                         ("v", r"got r .* v \[2, 1, 1, 16\]"),
                                         ("state", r"initial_state must be .* got \[2, 2, 16, 8\]"),
                                         ("fla_on_cpu", "needs CUDA tensors")])
def test_kappa_step_bad_input_raises(bad, message):
    r, w, k, v, kk, alpha, h0 = kappa_inputs(8)
    kwargs = {}
    if bad == "kk":
        kk = kk[..., :8]
    elif bad == "v":
        v = v[:, :, :1]
    elif bad == "state":
        h0 = h0[..., :8]
    else:
        kwargs["impl"] = "fla"
    with pytest.raises(ValueError, match=message):
        rwkv7_kappa_step(r, w, k, v, kk, alpha, initial_state=h0, **kwargs)


def check_fla_kappa_step_interpreted() -> None:
    """fla's `fused_mul_recurrent_rwkv7` (our impl="fla") equals the torch path, float32, max |error| ≤ 1e-5 ·
    max(1, max |reference|), with and without a state; it refuses inputs that require grad. Run only in a process
    set up by tests.ops.fla_interpret (Triton's interpreter on CPU): the next test does that."""
    *inputs, h0 = kappa_inputs(9)
    for state in (h0, None):
        expected = rwkv7_kappa_step(*inputs, initial_state=state, impl="torch")
        with torch.no_grad():
            actual = rwkv7_kappa_step(*inputs, initial_state=state, impl="fla")
        assert actual[1].dtype == torch.float32
        for what, a, b in zip(("o", "state"), actual, expected):
            assert_near(a, b, 1e-5, f"{what} ({'with' if state is not None else 'without'} a state)")
    try:
        rwkv7_kappa_step(inputs[0].requires_grad_(), *inputs[1:], initial_state=h0, impl="fla")
    except ValueError as error:
        assert "computes no gradients" in str(error), error
    else:
        raise AssertionError("impl='fla' accepted an input that requires grad")


@pytest.mark.slow
def test_fla_kappa_step_matches_torch_path_interpreted():
    """fla's decode kernel, run on CPU by Triton's interpreter in a fresh process (~10 s)."""
    pytest.importorskip("fla")
    script = ("import tests.ops.fla_interpret; from tests.ops.test_rwkv7 import check_fla_kappa_step_interpreted; "
              "check_fla_kappa_step_interpreted(); print('ok')")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.gpu
def test_fla_kappa_step_matches_torch_step_bf16():
    pytest.importorskip("fla")
    *inputs, h0 = (x.cuda() for x in kappa_inputs(10, K=64))
    o_ref, S_ref = rwkv7_kappa_step(*inputs, initial_state=h0, impl="torch")
    with torch.no_grad():
        o, S = rwkv7_kappa_step(*(x.bfloat16() for x in inputs), initial_state=h0, impl="fla")
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert rel_err(o, o_ref) <= 2e-2 and rel_err(S, S_ref) <= 2e-2
