"""Shared pieces of the op tests: random inputs with hard gates, the two error measures, gradient comparison and
saved-memory measurement. Each test file keeps its op's own references and edge cases.

Error measures: `assert_near` bounds max |error| by tol · max(1, max |reference|); `rel_err` is the normwise
relative error (for low-precision runs against a float32 reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import bench.ops


def assert_near(actual, expected, tol, what=""):
    err = (actual - expected).abs().max().item()
    bound = tol * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{what}: max |error| {err:.3g} > {bound:.3g}"


def rel_err(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def qkv(gen, B, T, H, K, V, dtype):
    """Queries (or receptances), keys (B, T, H, K) and values (B, T, H, V), drawn in that order."""
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, torch.randn(B, T, H, V, generator=gen, dtype=dtype)


def log_gates(gen, shape, dtype):
    """Log forget gates / decays: mostly mild, one in five very strong (down to ≈ −60 per step, so a cumulative
    decay underflows)."""
    g = F.logsigmoid(3 * torch.randn(*shape, generator=gen, dtype=dtype))
    return g * torch.where(torch.rand(*shape, generator=gen) < 0.2, 20.0, 1.0).to(dtype)


def vjp(outputs, inputs, cotangents):
    """Gradients of Σ ⟨output, cotangent⟩ w.r.t. inputs; a cotangent None stands for ones (the plain sum)."""
    loss = sum((o if c is None else o * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs)


def assert_matches(outputs, references, inputs, names, tol, cotangents="random"):
    """outputs (o, then the final state if any) equal references to tol (assert_near), and so do the gradients
    w.r.t. every input (named by names) of Σ ⟨output, cotangent⟩, the cotangents random normals drawn in the
    outputs' order (cotangents="random") or ones (cotangents="ones")."""
    for what, a, b in zip(("o", "final state"), outputs, references):
        assert_near(a, b, tol, what)
    cots = [torch.randn_like(o) if cotangents == "random" else None for o in outputs]
    grads, grads_ref = vjp(outputs, inputs, cots), vjp(references, inputs, cots)
    for name, a, b in zip(names, grads, grads_ref):
        assert_near(a, b, tol, f"d{name}")


def assert_grads_rel(outputs, inputs, references, ref_inputs, names, cotangents, tol=5e-2):
    """Low-precision gradients against the float32 reference's: normwise relative error ≤ tol, input by input."""
    grads_ref = vjp(references, ref_inputs, cotangents)
    grads = vjp([o.float() for o in outputs], inputs, cotangents)
    for name, a, b in zip(names, grads, grads_ref):
        assert rel_err(a, b) <= tol, name


def saved_bytes(fn):
    """Bytes of the distinct buffers autograd keeps for backward during fn()."""
    return bench.ops.saved_bytes(fn, [])


def assert_saved_memory_linear(call_at):
    """call_at(T) makes inputs of length T and returns the op's call on them: what it saves for backward grows
    at most linearly from T = 512 to 1024."""
    small, large = (saved_bytes(call_at(T)) for T in (512, 1024))
    assert large <= 2.05 * small, f"saved bytes {small} at T=512, {large} at T=1024: not linear"
