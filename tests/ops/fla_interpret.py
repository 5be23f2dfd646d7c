"""fla-core's Triton kernels on CPU under Triton's interpreter, checking our fla dispatch with document masking
against our torch path. Run as a fresh process (TRITON_INTERPRET must be set before triton is imported):

    python -m tests.ops.fla_interpret gla|rwkv7|forgetting

Exits non-zero (an AssertionError naming the tensor) on a mismatch; `test_fla_interpret.py` runs it.

Three gaps of the interpreter are bridged here (triton 3.x, fla-core 0.6.0):
- the autotuner benchmarks its configs through a GPU driver, and there is none: keep the first config only;
- `for i in range(n)` gives Python ints in the interpreter where compiled Triton gives tensors, and fla calls
  `i_t.to(tl.int64)`: the loop variable is turned into an interpreter tensor at the top of each iteration;
- fla binds `gather = tl.gather` at import, before the interpreter patches `tl` for a kernel call: the alias
  becomes a function that looks `tl.gather` up when called.
bf16 `tl.dot` is wrong under the interpreter, so everything runs in float32.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import ast  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402


def _first_config_only():
    prune = Autotuner.prune_configs
    Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]


def _range_loop_variables_as_tensors():
    def visit_For(self, node):
        node = self.generic_visit(node)
        call = node.iter
        is_range = isinstance(call, ast.Call) and (
            isinstance(call.func, ast.Name) and call.func.id == "range"
            or isinstance(call.func, ast.Attribute) and call.func.attr == "range")  # range / tl.range, not static
        if is_range and isinstance(node.target, ast.Name):
            name = node.target.id
            to_tensor = ast.Attribute(value=ast.Name("interpreter_semantic", ast.Load()), attr="to_tensor",
                                      ctx=ast.Load())
            convert = ast.Assign(targets=[ast.Name(name, ast.Store())],
                                 value=ast.Call(func=to_tensor, args=[ast.Name(name, ast.Load()), ast.Constant(False)],
                                                keywords=[]))
            node.body.insert(0, convert)
        return node

    interpreter.ASTTransformer.visit_For = visit_For


def _gather_looked_up_at_call():
    import fla.ops  # noqa: F401  (loads the kernel modules whose globals hold the alias)

    def gather(src, index, axis):
        return tl.gather(src, index, axis)

    for module in list(sys.modules.values()):
        if module is not None and module.__name__.startswith("fla.") and getattr(module, "gather", None) is tl.gather:
            module.gather = gather


def _fla_on_cpu():
    """Our ops refuse impl="fla" off CUDA; let them dispatch to the interpreted kernels."""
    import importlib

    modules = [importlib.import_module(f"pretrain.ops.{name}") for name in ("gla", "rwkv7", "forgetting")]
    resolve = modules[0]._resolve_impl

    def resolve_allowing_cpu(impl, x, valid, op):
        return impl if impl == "fla" else resolve(impl, x, valid, op)

    for module in modules:
        module._resolve_impl = resolve_allowing_cpu


_first_config_only()
_range_loop_variables_as_tensors()
_gather_looked_up_at_call()
_fla_on_cpu()

from pretrain.ops import DocumentMask, forgetting_attention, gla, rwkv7  # noqa: E402
from tests.ops.helpers import assert_near, qkv  # noqa: E402

T = 80
STARTS = ((13, 53), (0, 29, 61))  # row 0 continues its initial state, row 1 starts with a document
TOL = 1e-4  # float32, max |error| relative to max(1, max |reference|)


def document_mask() -> DocumentMask:
    starts = torch.zeros(len(STARTS), T, dtype=torch.bool)
    for b, row in enumerate(STARTS):
        starts[b, list(row)] = True
    return DocumentMask(starts)


def compare(call, inputs, names):
    """call(inputs, impl) → list of outputs; the fla dispatch equals the torch path, outputs and gradients."""
    results = []
    for impl in ("torch", "fla"):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        outs = call(leaves, impl)
        cotangents = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
        grads = torch.autograd.grad(sum((o.float() * c).sum() for o, c in zip(outs, cotangents)), leaves)
        results.append((outs, grads))
    (ref_outs, ref_grads), (outs, grads) = results
    for what, a, b in zip(("o", "final state"), outs, ref_outs):
        assert_near(a.float(), b.float(), TOL, what)
    for name, a, b in zip(names, grads, ref_grads):
        assert_near(a, b, TOL, f"d{name}")


def check_gla():
    gen = torch.Generator().manual_seed(0)
    q, k, v = qkv(gen, 2, T, 2, 16, 16, torch.float32)
    g = F.logsigmoid(torch.randn(2, T, 2, 16, generator=gen)) / 16  # GLA's gate range
    h0 = torch.randn(2, 2, 16, 16, generator=gen)
    docs = document_mask()
    compare(lambda xs, impl: list(gla(*xs[:4], initial_state=xs[4], output_final_state=True, impl=impl, docs=docs)),
            [q, k, v, g, h0], ("q", "k", "v", "g", "h0"))


def check_rwkv7():
    gen = torch.Generator().manual_seed(1)
    r, k, v = qkv(gen, 2, T, 2, 16, 16, torch.float32)
    w = -0.6065 * torch.sigmoid(torch.randn(2, T, 2, 16, generator=gen))  # RWKV-7's decay range
    kappa = F.normalize(torch.randn(2, T, 2, 16, generator=gen), dim=-1)
    a, b = -kappa, kappa * torch.rand(2, T, 2, 16, generator=gen)
    h0 = torch.randn(2, 2, 16, 16, generator=gen)
    docs = document_mask()
    compare(lambda xs, impl: list(rwkv7(*xs[:6], initial_state=xs[6], output_final_state=True, impl=impl,
                                        docs=docs)),
            [r, w, k, v, a, b, h0], ("r", "w", "k", "v", "a", "b", "h0"))


def check_forgetting():
    gen = torch.Generator().manual_seed(2)
    q, k, v = qkv(gen, 2, T, 2, 16, 16, torch.float32)
    log_f = F.logsigmoid(torch.randn(2, T, 2, generator=gen) + 2)
    docs = document_mask()
    compare(lambda xs, impl: [forgetting_attention(*xs, impl=impl, docs=docs)], [q, k, v, log_f],
            ("q", "k", "v", "log_f"))
    past = (k[:, :5], v[:, :5], log_f[:, :5])
    try:
        forgetting_attention(q, k, v, log_f, past=past, impl="fla", docs=docs)
    except ValueError as error:
        assert "no past" in str(error), error
    else:
        raise AssertionError("impl='fla' with docs and past did not raise")


# --------------------------------------------------------------------------- flash-attn stand-in

# fla's softmax `Attention` layer (fla/layers/attn.py, what the `attn` option of its GLA / RWKV-7 configs inserts)
# calls flash-attn, which has no CPU build: its __init__ raises ImportError while `flash_attn_func` is None. For
# tests, torch SDPA stands in for the two functions it calls, in the one form fla's Attention uses without a
# sliding window; anything else raises, so a test never runs on a semantics the stand-in does not have.

def _refuse_other_forms(causal, window_size, dropout_p, options) -> None:
    if not causal or tuple(window_size) != (-1, -1) or dropout_p or options:
        raise NotImplementedError(
            f"the SDPA stand-in for flash-attn computes causal attention without a window, dropout or other options "
            f"only; got causal={causal}, window_size={window_size}, dropout_p={dropout_p}, {sorted(options)}")


def sdpa_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **options):
    """flash_attn_func(q, k, v, causal=True) for q, k, v (B, T, H, D) of one length and head count, by torch SDPA
    (flash-attn's default scale 1/√D is SDPA's too)."""
    _refuse_other_forms(causal, window_size, dropout_p, options)
    if q.shape != k.shape or k.shape != v.shape:
        raise NotImplementedError(f"the SDPA stand-in takes q, k, v of one shape (no GQA, no KV cache); got "
                                  f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       scale=softmax_scale)  # (B, H, T, D)
    return o.transpose(1, 2)  # (B, T, H, D)


def sdpa_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                softmax_scale=None, causal=False, window_size=(-1, -1), **options):
    """flash_attn_varlen_func for packed q, k, v (N, H, D) whose sequences (cu_seqlens) are the same for queries
    and keys: causal attention inside each sequence."""
    _refuse_other_forms(causal, window_size, dropout_p, options)
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("the SDPA stand-in takes the same sequences for queries and keys (no KV cache)")
    bounds = cu_seqlens_q.tolist()
    return torch.cat([sdpa_flash_attn_func(q[None, s:e], k[None, s:e], v[None, s:e], causal=True,
                                           softmax_scale=softmax_scale)[0]
                      for s, e in zip(bounds[:-1], bounds[1:])])  # (N, H, D)


@contextlib.contextmanager
def flash_attn_stand_in():
    """fla.layers.attn with the SDPA stand-ins as its flash-attn functions, restored afterwards."""
    import fla.layers.attn as attn

    missing = object()
    saved = {name: getattr(attn, name, missing) for name in ("flash_attn_func", "flash_attn_varlen_func")}
    attn.flash_attn_func, attn.flash_attn_varlen_func = sdpa_flash_attn_func, sdpa_flash_attn_varlen_func
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(attn, name)
            else:
                setattr(attn, name, value)


def _softmax_attention_fp64(q, k, v, scale):
    """Causal softmax attention written out in float64 (B, T, H, D): the stand-in's oracle."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # (B, H, T, T)
    T = q.shape[1]
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)  # (B, T, H, D)


def check_flash_attn():
    """The stand-ins equal causal softmax attention in fp64 (dense, packed sequences, a given scale) and refuse
    the forms they do not compute."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 20, 3, 8, generator=gen) for _ in range(3))
    for scale in (None, 0.3):
        expected = _softmax_attention_fp64(q, k, v, 8 ** -0.5 if scale is None else scale)
        assert_near(sdpa_flash_attn_func(q, k, v, softmax_scale=scale, causal=True).double(), expected, 1e-5, "o")
    cu_seqlens = torch.tensor([0, 5, 12, 20, 33, 40], dtype=torch.int32)
    packed = [t.flatten(0, 1) for t in (q, k, v)]  # (40, H, D): rows one after the other
    o = sdpa_flash_attn_varlen_func(*packed, cu_seqlens, cu_seqlens, 13, 13, causal=True)
    bounds = cu_seqlens.tolist()
    expected = torch.cat([_softmax_attention_fp64(*(t[None, s:e] for t in packed), 8 ** -0.5)[0]
                          for s, e in zip(bounds[:-1], bounds[1:])])
    assert_near(o.double(), expected, 1e-5, "o (varlen)")
    for options in ({"causal": False}, {"causal": True, "window_size": (3, 0)},
                    {"causal": True, "dropout_p": 0.1}, {"causal": True, "softcap": 1.0}):
        try:
            sdpa_flash_attn_func(q, k, v, **options)
        except NotImplementedError:
            continue
        raise AssertionError(f"the SDPA stand-in accepted {options}")


if __name__ == "__main__":
    {"gla": check_gla, "rwkv7": check_rwkv7, "forgetting": check_forgetting,
     "flash_attn": check_flash_attn}[sys.argv[1]]()
    print("ok")
