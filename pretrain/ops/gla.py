"""Gated linear attention (GLA, Yang et al. 2023): chunkwise-parallel PyTorch, or fla-core's Triton kernel on GPU.

    S_t = Diag(exp(g_t)) S_{t-1} + k_tᵀ v_t          S: [K, V] per head
    o_t = scale · q_t S_t

The torch path splits time into chunks of C tokens. Inside a chunk everything is matmuls; only the [K, V]
state crosses chunk boundaries, in a loop over T / C chunks, so memory is linear in T. Decays enter as
exponentials of *differences* of within-chunk cumulative log decays that are never positive (the GLA paper's
secondary chunking), so any decay strength, e.g. g ≈ -50 per step, stays finite and exact.

Document masking (`docs`): a document start at step t resets the state, S_t = k_tᵀ v_t, with no infinity
anywhere. Inside a chunk the steps fall into segments (the resets counted from the chunk start), pairs of
different segments get factor 0 in `_lower_scores`, the state entering the chunk reaches only the steps before
its first reset, and the chunk's end state keeps only its last segment. With impl="fla", fla's `chunk_gla`
runs the rows flattened to one (1, B·T) sequence cut at `cu_seqlens`.

Decoding one token at a time (an inference cache), `gla_step` runs the recurrence itself, a few elementwise ops
on the state (fla's `fused_recurrent_gla` on GPU): the chunked path costs about ten times as much at T = 1 on CPU.

The chunk helpers here (`_to_chunks`, `_lower_scores`, `_chunk_segments`, `_resolve_impl`, ...) are shared with
`rwkv7.py` and `forgetting.py`.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from pretrain.ops.documents import DocumentMask, check_docs

CHUNK_SIZE = 32  # torch path's default chunk length (also rwkv7's); `metrics.flops_per_token` counts with it
SUB = 8  # sub-chunk length: the only place pairwise decays are materialised per channel ([SUB, SUB, K])


@functools.cache
def _fla_importable() -> bool:
    try:
        importlib.import_module("fla.ops")  # the real package, so a broken triton counts as "not available"
    except Exception:
        return False
    return True


def _resolve_impl(impl: str, x: torch.Tensor, valid: tuple[str, ...], op: str) -> str:
    """Map impl="auto" to a concrete backend and reject impossible requests with a clear message."""
    if impl not in valid:
        raise ValueError(f"{op}: impl must be one of {', '.join(repr(v) for v in valid)}; got {impl!r}")
    if impl == "auto":
        return "fla" if x.is_cuda and _fla_importable() else "torch"
    if impl == "fla" and not x.is_cuda:
        raise ValueError(f"{op}: impl='fla' runs Triton kernels and needs CUDA tensors; use impl='torch' on CPU")
    return impl


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 inputs are upcast (as fla's references do); fp64 stays fp64 so tests can check to 1e-10.
    return torch.promote_types(dtype, torch.float32)


def _chunk_len(T: int, chunk_size: int) -> int:
    if chunk_size <= 0 or chunk_size % SUB:
        raise ValueError(f"chunk_size must be a positive multiple of {SUB}; got {chunk_size}")
    if T == 0:
        raise ValueError("the sequence is empty (T = 0)")
    # short sequences get one small chunk instead of padding up to a full one
    return min(chunk_size, -(-T // SUB) * SUB)


def _to_chunks(x: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, H, D) → (B, H, N, C, D), zero-padded at the end of time to N·C steps."""
    B, T, H, D = x.shape
    N = -(-T // C)
    x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, N * C - T))  # (B, N·C, H, D)
    return x.view(B, N, C, H, D).permute(0, 3, 1, 2, 4)  # (B, H, N, C, D)


def _from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """(B, H, N, C, D) → (B, T, H, D), dropping the padding."""
    B, H, N, C, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, D)[:, :T]  # (B, T, H, D)


def _chunk_segments(docs: DocumentMask, C: int) -> torch.Tensor:
    """(B, 1, N, C) int64: the document starts counted from each chunk's start through step t (0 = still the
    piece that was running when the chunk began); padding steps continue the last segment."""
    B, T = docs.shape
    N = -(-T // C)
    starts = F.pad(docs.starts.long(), (0, N * C - T))  # (B, N·C)
    return starts.view(B, 1, N, C).cumsum(-1)  # (B, 1, N, C), broadcast over heads


def _segment_masks(seg: torch.Tensor):
    """From chunk segments (B, 1, N, C): whether the state entering the chunk reaches step t (no start at or
    before t), (B, 1, N, C, 1); whether step t is in the chunk's last segment (its writes reach the chunk's
    end state), (B, 1, N, C, 1); whether the chunk has no start at all (its entering state reaches its end),
    (B, 1, N, 1)."""
    fresh = (seg == 0).unsqueeze(-1)
    last = (seg == seg[..., -1:]).unsqueeze(-1)
    whole = (seg[..., -1:] == 0)
    return fresh, last, whole


def _lower_scores(x: torch.Tensor, bx: torch.Tensor, y: torch.Tensor, by: torch.Tensor, *, strict: bool,
                  seg: torch.Tensor | None = None) -> torch.Tensor:
    """Decay-weighted scores inside each chunk, lower triangular:

        A[t, s] = Σ_k x[t, k] · y[s, k] · exp(bx[t, k] − by[s, k])   for s ≤ t (s < t if strict), else 0,

    and 0 also where seg[t] ≠ seg[s] when segments (..., C) are given (a document start between s and t).

    x, bx: (..., C, K); y, by broadcast against them (y may carry an extra leading stack dim). bx, by are
    within-chunk cumulative log decays, and the caller guarantees bx[t] ≤ by[s] for every s < t, so every
    kept exponent is ≤ 0.

    Splitting the exponent as (bx[t] − r) + (r − by[s]) lets whole blocks become one matmul, but both
    halves are ≤ 0 (no overflow) only when the reference r sits between s and t. So the chunk is cut into
    sub-chunks of SUB steps: a pair of different sub-chunks uses r = by at the end of the key sub-chunk, a
    pair inside one sub-chunk takes the exact pairwise exponent per channel.

    Segments never decrease in time, so for s in sub-chunk Y and t after it seg[s] ≤ seg[end of Y] ≤ seg[t]:
    the pair is in one segment exactly when t and s are each in the segment of Y's end. Masking the two halves
    of the factorisation by that keeps it exact and still one matmul.

    The backward is written by hand: it saves only the inputs and rebuilds the decay factors, where autograd
    would keep several [SUB, SUB, K]-per-sub-chunk intermediates alive. Masked factors are 0 there too, so
    pairs across a document start get zero gradient.
    """
    return _LowerScores.apply(x, bx, y, by, strict, seg)


def _score_factors(bx, by, strict, seg=None):
    """Decay factors of `_lower_scores`, all exponentials of non-positive numbers (masked ones → 0).

    Returns diag (..., n, SUB, SUB, K) = exp(bx[t] − by[s]) for t, s in one sub-chunk; x_dec (..., n, C, K) =
    exp(bx[t] − r_Y) for steps t after sub-chunk Y; y_dec (..., n, SUB, K) = exp(r_Y − by[s]) for s in Y. With
    segments seg (..., C), diag keeps pairs of one segment, x_dec and y_dec the steps in the segment of Y's end.
    """
    C = bx.shape[-2]
    n = C // SUB
    dev = bx.device
    bxs, bys = bx.unflatten(-2, (n, SUB)), by.unflatten(-2, (n, SUB))  # (..., n, SUB, K)
    keep = torch.ones(SUB, SUB, dtype=torch.bool, device=dev).tril(-1 if strict else 0)  # [t, s]
    later = torch.arange(C, device=dev) // SUB > torch.arange(n, device=dev)[:, None]  # (n, C)  [Y, t]
    if seg is not None:
        segs = seg.unflatten(-1, (n, SUB))  # (..., n, SUB)
        seg_r = segs[..., -1:]  # (..., n, 1)  the segment of each sub-chunk's last step
        keep = keep & (segs.unsqueeze(-1) == segs.unsqueeze(-2))  # (..., n, SUB, SUB)
        later = later & (seg.unsqueeze(-2) == seg_r)  # (..., n, C)
    diag = (bxs.unsqueeze(-2) - bys.unsqueeze(-3)).masked_fill_(~keep.unsqueeze(-1), float("-inf")).exp_()
    r = bys[..., -1:, :]  # (..., n, 1, K)  r_Y: by at the last step of key sub-chunk Y
    x_dec = (bx.unsqueeze(-3) - r).masked_fill_(~later.unsqueeze(-1), float("-inf")).exp_()  # (..., n, C, K)
    y_dec = (r - bys).exp_()  # (..., n, SUB, K)
    if seg is not None:
        y_dec = y_dec.masked_fill_((segs != seg_r).unsqueeze(-1), 0.0)
    return diag, x_dec, y_dec


class _LowerScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bx, y, by, strict, seg):
        ctx.save_for_backward(x, bx, y, by, seg)
        ctx.strict = strict
        *lead, C, K = torch.broadcast_shapes(x.shape, y.shape)
        n = C // SUB
        diag, x_dec, y_dec = _score_factors(bx, by, strict, seg)
        xs, ys = x.unflatten(-2, (n, SUB)), y.unflatten(-2, (n, SUB))  # (..., n, SUB, K)
        # x·decay first: y may be stacked, so the product with y is the only one at the stacked size
        A_diag = (xs.unsqueeze(-2) * diag * ys.unsqueeze(-3)).sum(-1)  # (..., n, SUB, SUB)
        A_off = ((x.unsqueeze(-3) * x_dec) @ (ys * y_dec).transpose(-1, -2)).movedim(-3, -2)  # (..., C, n, SUB)
        eye = torch.eye(n, dtype=A_off.dtype, device=x.device)[:, None, :, None]  # (n, 1, n, 1)  [X, t, Y, s]
        A = A_off.unflatten(-3, (n, SUB)) + eye * A_diag.unsqueeze(-2)  # (..., n, SUB, n, SUB)
        return A.reshape(*lead, C, C)  # (..., C, C)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dA):
        # dA (..., C, C). With P[t, s, k] = dA[t, s] · exp(bx[t, k] − by[s, k]) over kept pairs:
        # dx = Σ_s P y, dy = Σ_t P x, and since the exponent is bx − by, dbx = x ⊙ dx, dby = −y ⊙ dy.
        x, bx, y, by, seg = ctx.saved_tensors
        C = dA.shape[-1]
        n = C // SUB
        diag, x_dec, y_dec = _score_factors(bx, by, ctx.strict, seg)
        xs, ys = x.unflatten(-2, (n, SUB)), y.unflatten(-2, (n, SUB))  # (..., n, SUB, K)

        dA_blocks = dA.unflatten(-1, (n, SUB)).movedim(-2, -3)  # (..., n, C, SUB)  [Y, t, s]
        dx = ((dA_blocks @ (ys * y_dec)) * x_dec).sum(-3)  # (..., C, K)
        dy = ((dA_blocks.transpose(-1, -2) @ (x.unsqueeze(-3) * x_dec)) * y_dec).flatten(-3, -2)  # (..., C, K)

        # same-sub-chunk blocks [X, t, X, s] of dA, then the exact per-channel part
        dA_diag = torch.diagonal(dA_blocks.unflatten(-2, (n, SUB)), dim1=-4, dim2=-3)  # (..., SUB, SUB, n)
        P = dA_diag.movedim(-1, -3).unsqueeze(-1) * diag  # (..., n, SUB, SUB, K)
        dx = dx + (P * ys.unsqueeze(-3)).sum(-2).flatten(-3, -2)
        dy = dy + (P * xs.unsqueeze(-2)).sum(-3).flatten(-3, -2)

        dbx = (x * dx).sum_to_size(bx.shape)
        dby = -(y * dy).sum_to_size(by.shape)
        return dx.sum_to_size(x.shape), dbx, dy.sum_to_size(y.shape), dby, None, None


def _check_state(state: torch.Tensor | None, B: int, H: int, K: int, V: int, op: str) -> None:
    if state is not None and tuple(state.shape) != (B, H, K, V):
        raise ValueError(f"{op}: initial_state must be [B, H, K, V] = {[B, H, K, V]}; got {list(state.shape)}")


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None, *,
        initial_state: torch.Tensor | None = None, output_final_state: bool = False, impl: str = "auto",
        chunk_size: int = CHUNK_SIZE,
        docs: DocumentMask | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention; equals fla's `naive_recurrent_gla(q, k, v, g)`.

    q, k, g: [B, T, H, K] (g = log decay ≤ 0 per key channel); v: [B, T, H, V]; scale defaults to K^-0.5.
    initial_state: [B, H, K, V] state before the first step. Returns o [B, T, H, V] in q's dtype, or
    (o, final_state [B, H, K, V], float32 or wider) when output_final_state.
    impl: "auto" (fla's `chunk_gla` for CUDA tensors when fla imports, else "torch"), "torch", "fla".
    chunk_size: torch path only, a multiple of 8 (`gla.SUB`).
    docs: document starts (B, T); the state is zero before each start (initial_state included, where a row
    starts with one), so each row's final state is its last document's.
    """
    if q.ndim != 4 or k.shape != q.shape or g.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gla wants q, k, g as [B, T, H, K] (all alike) and v as [B, T, H, V]; got q "
                         f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, g {list(g.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_state(initial_state, B, H, K, V, "gla")
    if docs is not None:
        check_docs(docs, q, "gla")
    scale = K ** -0.5 if scale is None else scale
    if _resolve_impl(impl, q, ("auto", "torch", "fla"), "gla") == "fla":
        from fla.ops.gla import chunk_gla

        # fla asserts a float32 initial state; it returns the final state in float32 too
        h0 = None if initial_state is None else initial_state.float()
        if docs is None:
            o, state = chunk_gla(q, k, v, g, scale=scale, initial_state=h0, output_final_state=output_final_state)
        else:
            o, state = _fla_varlen(chunk_gla, (q, k, v, g), docs, initial_state=h0,
                                   output_final_state=output_final_state, scale=scale)
    else:
        o, state = _gla_torch(q, k, v, g, scale, initial_state, chunk_size, docs=docs)
    return (o, state) if output_final_state else o


def gla_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None, *,
             initial_state: torch.Tensor | None = None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `gla` (T = 1), for decoding with a recurrent state: S = Diag(e^g) S + kᵀv, o = scale · q S.

    q, k, g: [B, 1, H, K]; v: [B, 1, H, V]; initial_state: [B, H, K, V] before the step (None: zeros). Returns
    (o [B, 1, H, V] in q's dtype, the new state [B, H, K, V], float32 or wider), as `gla(...,
    output_final_state=True)` would for T = 1, but with a handful of elementwise ops instead of the chunked
    machinery (padding to a sub-chunk, scores, a loop over chunks). impl: "auto" (fla's `fused_recurrent_gla` for
    CUDA tensors when fla imports, else "torch"), "torch", "fla". impl="fla" is for inference only: fla's
    `fused_recurrent_gla` does have a backward, but no test here checks it (training runs `gla`, i.e. `chunk_gla`).
    """
    if q.ndim != 4 or q.shape[1] != 1 or k.shape != q.shape or g.shape != q.shape or v.ndim != 4 \
            or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gla_step wants q, k, g as [B, 1, H, K] (all alike) and v as [B, 1, H, V]; got q "
                         f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, g {list(g.shape)}")
    B, _, H, K = q.shape
    _check_state(initial_state, B, H, K, v.shape[-1], "gla_step")
    scale = K ** -0.5 if scale is None else scale
    if _resolve_impl(impl, q, ("auto", "torch", "fla"), "gla_step") == "fla":
        from fla.ops.gla import fused_recurrent_gla

        h0 = None if initial_state is None else initial_state.float()  # fla's kernels keep the state in float32
        return fused_recurrent_gla(q, k, v, g, scale=scale, initial_state=h0, output_final_state=True)
    out_dtype, dt = q.dtype, _compute_dtype(q.dtype)
    q, k, v, g = (x[:, 0].to(dt) for x in (q, k, v, g))  # (B, H, ·)
    S = k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, K, V)  this step's write
    if initial_state is not None:
        S = torch.addcmul(S, g.exp().unsqueeze(-1), initial_state.to(dt))  # (B, H, K, V)
    o = (q.unsqueeze(-2) @ S) * scale  # (B, H, 1, V)
    return o.transpose(1, 2).to(out_dtype), S  # (B, 1, H, V), (B, H, K, V)


def _fla_varlen(kernel, inputs, docs: DocumentMask, *, initial_state, output_final_state, **kwargs):
    """Run an fla chunk kernel with document masking: the rows flattened to one (1, B·T) sequence cut into the
    pieces of `docs.cu_seqlens`, per-row states mapped to the pieces and back (`DocumentMask.to_pieces`)."""
    B, T = docs.shape
    flat = [x.reshape(1, B * T, *x.shape[2:]) for x in inputs]  # (1, B·T, H, ·)
    h0 = None if initial_state is None else docs.to_pieces(initial_state)  # (N, H, K, V)
    # the cached cu_seqlens object also keys fla's own per-tensor caches (chunk indices), shared across layers
    o, states = kernel(*flat, initial_state=h0, output_final_state=output_final_state, cu_seqlens=docs.cu_seqlens,
                       **kwargs)
    state = docs.to_rows(states) if output_final_state else None  # (B, H, K, V)
    return o.view(B, T, *o.shape[2:]), state  # (B, T, H, V)


def _gla_torch(q, k, v, g, scale, initial_state, chunk_size, *, docs):
    B, T, H, K = q.shape
    V, out_dtype = v.shape[-1], q.dtype
    dt = _compute_dtype(q.dtype)
    C = _chunk_len(T, chunk_size)
    # padding steps have k = v = 0 and g = 0 (no decay), so they leave the final state untouched
    q, k, v, g = (_to_chunks(x, C, dt) for x in (q, k, v, g))  # (B, H, N, C, ·)
    seg = None if docs is None else _chunk_segments(docs, C)  # (B, 1, N, C)

    # a start cuts by zeroing factors, never by a −∞ log decay: b stays finite and so do its gradients.
    # (Without docs the autograd graph is built in the same order as before masking existed: the order of
    # gradient accumulation, and so every gradient bit, stays the same.)
    fresh, last, whole = (None,) * 3 if seg is None else _segment_masks(seg)

    b = g.cumsum(-2)  # (B, H, N, C, K)  log decay from the chunk start through step t
    A = _lower_scores(q, b, k, b, strict=False, seg=seg)  # (B, H, N, C, C)
    b_end = b[..., -1:, :]  # (B, H, N, 1, K)
    to_end = b_end - b  # (B, H, N, C, K)
    if seg is not None:
        # masked in the exponent: exp's own saved output then is the masked factor, not a second copy
        to_end = to_end.masked_fill(~last, float("-inf"))
    to_end = to_end.exp()
    kv = (k * to_end).transpose(-1, -2) @ v  # (B, H, N, K, V)  chunk's own contribution at its end
    decay = b_end.transpose(-1, -2).exp()  # (B, H, N, K, 1)
    if seg is not None:
        decay = decay * whole.unsqueeze(-1)

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)  # (B, H, K, V)
    starts = []
    # the only sequential part: one elementwise update per chunk (unbind: one backward op, not N scatters)
    for decay_n, kv_n in zip(decay.unbind(2), kv.unbind(2)):
        starts.append(S)
        S = decay_n * S + kv_n
    S_in = torch.stack(starts, dim=2)  # (B, H, N, K, V)  state entering each chunk

    q_dec = q * b.exp()  # (B, H, N, C, K)  how step t reads the state entering its chunk
    if seg is not None:
        q_dec = q_dec * fresh
    o = (q_dec @ S_in + A @ v) * scale  # (B, H, N, C, V)
    return _from_chunks(o, T).to(out_dtype), S


__all__ = ["gla", "gla_step"]
