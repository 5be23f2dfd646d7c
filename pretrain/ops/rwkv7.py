"""RWKV-7 state update (a diagonal-plus-low-rank, "generalised delta rule" recurrence): chunkwise-parallel
PyTorch, or fla-core's Triton kernel on GPU.

    S_t = Diag(exp(w_t)) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_tᵀ v_t          S: [K, V] per head
    o_t = r_t S_t

Chunkwise form (torch path). Within a chunk, with B_t the cumulative log decay from the chunk start through
step t and S_0 the state entering it, write u_t = a_tᵀ S_{t-1} (a row of V). Then S evolves like GLA fed by
two key/value pairs, (k_t, v_t) and (b_t, u_t):

    S_t = e^{B_t} ⊙ S_0 + Σ_{s≤t} e^{B_t − B_s} ⊙ (k_sᵀ v_s + b_sᵀ u_s)
    u_t = (a_t ⊙ e^{B_{t-1}}) S_0 + Σ_{s<t} [A_ak]_{ts} v_s + Σ_{s<t} [A_ab]_{ts} u_s

so U = (I − A_ab)⁻¹ (W S_0 + A_ak V) with W_t = a_t ⊙ e^{B_{t-1}}: one unit-lower-triangular solve per chunk
(the WY / UT transform of DeltaNet). Writing U = W' S_0 + U', each chunk maps its entering state linearly,
S_end = (Diag(e^{B_C}) + b̃ᵀ W') S_0 + (k̃ᵀ V + b̃ᵀ U') with k̃, b̃ decayed to the chunk end, so the only
sequential work is one [K, K] × [K, V] matmul per chunk. All decays are exponentials of non-positive
differences (sub-chunked as in `gla._lower_scores`), so strong decay cannot overflow; memory is linear in T.

Document masking (`docs`): at a document start t, S_{t-1} counts as zero, so both the decay and the b (aᵀ S)
term vanish (u_t = 0) and S_t = k_tᵀ v_t. As in `gla`, pairs of different segments of a chunk get factor 0 in
the scores (for the a-side too: u_t reads S_{t-1}, which a start at t empties), W and the r-side read S_0 only
before the chunk's first start, and the end-state map keeps the last segment (the diagonal decay only where
the chunk has no start; b̃ᵀ W' vanishes by itself then, since W' of the last segment is 0).

Decoding one token at a time (an inference cache), `rwkv7_step` runs the recurrence itself, one [K] × [K, V]
product and elementwise ops on the state (fla's `fused_recurrent_rwkv7` on GPU), not the chunked machinery;
`rwkv7_kappa_step` takes the layer's κ̂ and α instead of a and b (fla's `fused_mul_recurrent_rwkv7` forms them
inside its kernel), which is what the RWKV-7 layer decodes with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.ops.documents import DocumentMask, check_docs
from pretrain.ops.gla import CHUNK_SIZE, _check_state, _chunk_len, _chunk_segments, _compute_dtype, _fla_varlen, \
    _from_chunks, _lower_scores, _resolve_impl, _segment_masks, _to_chunks


def rwkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
          initial_state: torch.Tensor | None = None, output_final_state: bool = False, impl: str = "auto",
          chunk_size: int = CHUNK_SIZE,
          docs: DocumentMask | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 recurrence (scale 1); equals fla's `dplr_recurrence(r·√K, k, v, a, b, w)` in head-first layout.

    r, w, k, a, b: [B, T, H, K] (w = log decay ≤ 0); v: [B, T, H, V]. In the RWKV-7 layer a = −κ̂, b = κ̂ ⊙ α.
    initial_state: [B, H, K, V]. Returns o [B, T, H, V] in r's dtype, or (o, final_state [B, H, K, V],
    float32 or wider) when output_final_state.
    impl: "auto" (fla's `chunk_rwkv7` for CUDA tensors when fla imports, else "torch"), "torch", "fla".
    chunk_size: torch path only, a multiple of 8 (`gla.SUB`).
    docs: document starts (B, T); the state is zero before each start (initial_state included, where a row
    starts with one), so each row's final state is its last document's.
    """
    shape = r.shape
    if r.ndim != 4 or any(x.shape != shape for x in (w, k, a, b)) or v.ndim != 4 or v.shape[:3] != shape[:3]:
        raise ValueError(f"rwkv7 wants r, w, k, a, b as [B, T, H, K] (all alike) and v as [B, T, H, V]; got r "
                         f"{list(r.shape)}, w {list(w.shape)}, k {list(k.shape)}, v {list(v.shape)}, "
                         f"a {list(a.shape)}, b {list(b.shape)}")
    B, T, H, K = shape
    _check_state(initial_state, B, H, K, v.shape[-1], "rwkv7")
    if docs is not None:
        check_docs(docs, r, "rwkv7")
    if _resolve_impl(impl, r, ("auto", "torch", "fla"), "rwkv7") == "fla":
        from fla.ops.rwkv7 import chunk_rwkv7

        h0 = None if initial_state is None else initial_state.float()
        if docs is None:
            o, state = chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=h0,
                                   output_final_state=output_final_state)
        else:
            o, state = _fla_varlen(chunk_rwkv7, (r, w, k, v, a, b), docs, initial_state=h0,
                                   output_final_state=output_final_state, scale=1.0)
    else:
        o, state = _rwkv7_torch(r, w, k, v, a, b, initial_state, chunk_size, docs=docs)
    return (o, state) if output_final_state else o


def _check_step_shapes(r, w, k, v, a, b, initial_state, op: str) -> None:
    shape = r.shape
    if r.ndim != 4 or shape[1] != 1 or any(x.shape != shape for x in (w, k, a, b)) or v.ndim != 4 \
            or v.shape[:3] != shape[:3]:
        raise ValueError(f"{op} wants r, w, k, a, b as [B, 1, H, K] (all alike) and v as [B, 1, H, V]; got r "
                         f"{list(r.shape)}, w {list(w.shape)}, k {list(k.shape)}, v {list(v.shape)}, "
                         f"a {list(a.shape)}, b {list(b.shape)}")
    B, _, H, K = shape
    _check_state(initial_state, B, H, K, v.shape[-1], op)


def rwkv7_step(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
               initial_state: torch.Tensor | None = None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `rwkv7` (T = 1), for decoding with a recurrent state:
    S = Diag(e^w) S + b (aᵀ S) + kᵀ v, o = r S (the new S).

    r, w, k, a, b: [B, 1, H, K]; v: [B, 1, H, V]; initial_state: [B, H, K, V] before the step (None: zeros).
    Returns (o [B, 1, H, V] in r's dtype, the new state [B, H, K, V], float32 or wider), as `rwkv7(...,
    output_final_state=True)` would for T = 1, without the chunked machinery (scores, a triangular solve, a loop
    over chunks). impl: "auto" (fla's `fused_recurrent_rwkv7` for CUDA tensors when fla imports, else "torch"),
    "torch", "fla". impl="fla" is for inference only: fla's kernel has no backward (it raises in backward).
    """
    _check_step_shapes(r, w, k, v, a, b, initial_state, "rwkv7_step")
    if _resolve_impl(impl, r, ("auto", "torch", "fla"), "rwkv7_step") == "fla":
        from fla.ops.rwkv7 import fused_recurrent_rwkv7

        h0 = None if initial_state is None else initial_state.float()  # fla's kernels keep the state in float32
        return fused_recurrent_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=h0, output_final_state=True)
    out_dtype, dt = r.dtype, _compute_dtype(r.dtype)
    r, w, k, v, a, b = (x[:, 0].to(dt) for x in (r, w, k, v, a, b))  # (B, H, ·)
    S = k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, K, V)  this step's write
    if initial_state is not None:
        state = initial_state.to(dt)  # (B, H, K, V)
        u = a.unsqueeze(-2) @ state  # (B, H, 1, V)  aᵀ S, what the low-rank term reads
        S = S + w.exp().unsqueeze(-1) * state + b.unsqueeze(-1) * u  # (B, H, K, V)
    o = r.unsqueeze(-2) @ S  # (B, H, 1, V)
    return o.transpose(1, 2).to(out_dtype), S  # (B, 1, H, V), (B, H, K, V)


def rwkv7_kappa_step(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kk: torch.Tensor,
                     alpha: torch.Tensor, *, initial_state: torch.Tensor | None = None,
                     impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`rwkv7_step` in the RWKV-7 layer's own terms: a = −κ̂, b = κ̂ ⊙ α, given κ̂ (`kk`) and α (`alpha`),
    [B, 1, H, K] each; everything else as there. With impl="fla", fla's `fused_mul_recurrent_rwkv7` forms a and b
    inside its decode kernel, two elementwise kernels fewer per layer and token than `rwkv7_step(..., -kk,
    kk * alpha)`. impl="fla" is for inference only: that kernel records no autograd graph, so it refuses inputs
    that require grad while grad mode is on.
    """
    if kk.shape != r.shape or alpha.shape != r.shape:
        raise ValueError(f"rwkv7_kappa_step wants kk and alpha shaped like r {list(r.shape)}; got kk "
                         f"{list(kk.shape)}, alpha {list(alpha.shape)}")
    _check_step_shapes(r, w, k, v, kk, alpha, initial_state, "rwkv7_kappa_step")  # a, b: shaped like kk, alpha
    if _resolve_impl(impl, r, ("auto", "torch", "fla"), "rwkv7_kappa_step") != "fla":
        return rwkv7_step(r, w, k, v, -kk, kk * alpha, initial_state=initial_state, impl="torch")
    inputs = (r, w, k, v, kk, alpha, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        raise ValueError("rwkv7_kappa_step: impl='fla' computes no gradients (fla's fused_mul_recurrent_rwkv7 is an "
                         "inference kernel); run it under torch.no_grad() or use impl='torch'")
    from fla.ops.rwkv7 import fused_mul_recurrent_rwkv7

    h0 = None if initial_state is None else initial_state.float()  # fla's kernels keep the state in float32
    return fused_mul_recurrent_rwkv7(r, w, k, v, kk, alpha, scale=1.0, initial_state=h0, output_final_state=True)


def _rwkv7_torch(r, w, k, v, a, b, initial_state, chunk_size, *, docs):
    B, T, H, K = r.shape
    V, out_dtype = v.shape[-1], r.dtype
    dt = _compute_dtype(r.dtype)
    C = _chunk_len(T, chunk_size)
    # zero padding: w = 0 (no decay) and k = b = 0 (nothing written), so the final state is untouched
    r, w, k, v, a, b = (_to_chunks(x, C, dt) for x in (r, w, k, v, a, b))  # (B, H, N, C, ·)
    seg = None if docs is None else _chunk_segments(docs, C)  # (B, 1, N, C)

    # a start cuts by zeroing factors, never by a −∞ log decay: lw stays finite and so do its gradients.
    # (Without docs the autograd graph is built in the same order as before masking existed: the order of
    # gradient accumulation, and so every gradient bit, stays the same.)
    fresh, last, whole = (None,) * 3 if seg is None else _segment_masks(seg)

    lw = w.cumsum(-2)  # (B, H, N, C, K)  B_t: log decay from the chunk start through step t
    lw_prev = F.pad(lw[..., :-1, :], (0, 0, 1, 0))  # (B, H, N, C, K)  B_{t-1}: what a_t reads S_{t-1} under

    # one call each for the a-side (strict: u_t reads S_{t-1}) and r-side (inclusive) scores against k and b
    kb = torch.stack((k, b))  # (2, B, H, N, C, K)
    A_a = _lower_scores(a, lw_prev, kb, lw, strict=True, seg=seg)  # (2, B, H, N, C, C)  [A_ak, A_ab]
    A_r = _lower_scores(r, lw, kb, lw, strict=False, seg=seg)  # (2, B, H, N, C, C)  [A_rk, A_rb]

    # WY / UT transform: (I − A_ab) [W' | U'] = [W | A_ak V]
    eye = torch.eye(C, dtype=dt, device=r.device)
    a_dec = a * lw_prev.exp()  # (B, H, N, C, K)  W: how u_t reads the state entering the chunk
    if seg is not None:
        a_dec = a_dec * fresh
    rhs = torch.cat((a_dec, A_a[0] @ v), dim=-1)  # (B, H, N, C, K + V)
    wu = torch.linalg.solve_triangular(eye - A_a[1], rhs, upper=False, unitriangular=True)
    W, U = wu.split((K, V), dim=-1)  # (B, H, N, C, K), (B, H, N, C, V)

    to_end = lw[..., -1:, :] - lw  # (B, H, N, C, K)
    if seg is not None:
        # masked in the exponent: exp's own saved output then is the masked factor, not a second copy
        to_end = to_end.masked_fill(~last, float("-inf"))
    to_end = to_end.exp()
    k_end, b_end = (k * to_end).transpose(-1, -2), (b * to_end).transpose(-1, -2)  # (B, H, N, K, C)
    decay = lw[..., -1, :].exp()  # (B, H, N, K)
    if seg is not None:
        decay = decay * whole
    trans = torch.diag_embed(decay) + b_end @ W  # (B, H, N, K, K)  state map over a chunk
    const = k_end @ v + b_end @ U  # (B, H, N, K, V)

    S = r.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)  # (B, H, K, V)
    starts = []
    # the only sequential part: one [K, K] @ [K, V] per chunk (unbind: one backward op, not N scatters)
    for trans_n, const_n in zip(trans.unbind(2), const.unbind(2)):
        starts.append(S)
        S = trans_n @ S + const_n
    S_in = torch.stack(starts, dim=2)  # (B, H, N, K, V)  state entering each chunk

    u = W @ S_in + U  # (B, H, N, C, V)  u_t = a_t S_{t-1}
    r_dec = r * lw.exp()  # (B, H, N, C, K)  how o_t reads the state entering the chunk
    if seg is not None:
        r_dec = r_dec * fresh
    o = r_dec @ S_in + A_r[0] @ v + A_r[1] @ u  # (B, H, N, C, V)
    return _from_chunks(o, T).to(out_dtype), S


__all__ = ["rwkv7", "rwkv7_kappa_step", "rwkv7_step"]
