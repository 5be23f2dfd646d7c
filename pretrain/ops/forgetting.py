"""Forgetting attention (FoX, Lin et al. 2025): causal softmax attention whose logits get c_i − c_j, with
c = cumsum(log f) over time and log f = log σ(forget gate) ≤ 0 per head.

Backends:
- "torch": blockwise, FlashAttention-style autograd Function: queries in blocks, keys in blocks with an online
  softmax, the backward recomputes each block's probabilities from the saved log-sum-exp, so nothing of
  size T×T is ever held (peak extra memory is one [block_q, block_k] tile per batch·head).
- "fla": fla-core's `parallel_forgetting_attn` Triton kernel (CUDA).
- "flex": `torch.nn.attention.flex_attention` with a `score_mod` adding c_i − c_j (compiled on CUDA; on CPU
  PyTorch supports it forward-only, unfused).

Cache ("past"): a sequence split into pieces gives the same output as the whole when each call gets the
previous pieces' keys, values and gates, `past = (k_prev, v_prev, log_f_prev)`; `output_past=True` returns
the extended triple to pass to the next call. Gates are kept raw (not as c) so every call recomputes c from
the same cumulative sum the whole-sequence call would use.

Document masking (`docs`): a query sees only keys of its own document. The torch path masks key/query pairs
of different documents in each tile and skips tiles that no row can see; "flex" adds a document predicate to
the block mask; "fla" runs the rows flattened to one (1, B·T) sequence cut at `cu_seqlens`. The past's keys
count as the piece before a row's first start (so a start at t = 0 cuts the past away).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pretrain.ops.documents import DocumentMask, check_docs
from pretrain.ops.gla import _compute_dtype, _resolve_impl

Past = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def forgetting_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_f: torch.Tensor,
                         scale: float | None = None, *, past: Past | None = None, output_past: bool = False,
                         impl: str = "auto", block_q: int = 128, block_k: int = 512,
                         docs: DocumentMask | None = None) -> torch.Tensor | tuple[torch.Tensor, Past]:
    """softmax_j(q_i·k_j·scale + c_i − c_j) over j ≤ i, times v; equals fla's `naive_forgetting_attn`.

    q, k: [B, T, H, D]; v: [B, T, H, Dv]; log_f: [B, T, H]; scale defaults to D^-0.5.
    past: (k_prev [B, T0, H, D], v_prev [B, T0, H, Dv], log_f_prev [B, T0, H]) of the T0 preceding steps;
    queries then sit at positions T0 … T0+T−1 and attend to all T0+T keys.
    Returns o [B, T, H, Dv], or (o, (k_all, v_all, log_f_all)) when output_past.
    impl: "auto" (fla for CUDA tensors when fla imports, else "torch"), "torch", "fla", "flex".
    block_q, block_k: torch path tile sizes.
    docs: document starts of the T new steps (B, T); query i attends only to keys of its own document, the
    past's keys counting as the piece before the row's first start. The returned past spans every document
    of the call: before passing it on, make sure the next call's rows start where that holds (e.g. with a
    document start at t = 0, which cuts the whole past).
    impl="fla" takes no past with docs.
    """
    if (q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]
            or tuple(log_f.shape) != tuple(q.shape[:3])):
        raise ValueError(f"forgetting_attention wants q, k as [B, T, H, D], v as [B, T, H, Dv] and log_f as "
                         f"[B, T, H]; got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, "
                         f"log_f {list(log_f.shape)}")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q and block_k must be positive; got {block_q}, {block_k}")
    impl = _resolve_impl(impl, q, ("auto", "torch", "fla", "flex"), "forgetting_attention")
    if docs is not None:
        check_docs(docs, q, "forgetting_attention")
        if impl == "fla" and past is not None:
            raise ValueError("forgetting_attention: impl='fla' takes no past with docs (its varlen kernel is "
                             "square-causal per piece); use impl='flex' or 'torch', or call without past")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if past is not None:
        k, v, log_f = _extend(past, k, v, log_f)  # (B, T0+T, H, ·)

    if impl == "fla":
        o = _fla(q, k, v, log_f, scale) if docs is None else _fla_varlen(q, k, v, log_f, scale, docs)
    elif impl == "flex":
        o = _flex(q, k, v, log_f, scale, docs=docs)
    else:
        o = _torch(q, k, v, log_f, scale, block_q, block_k, docs=docs)
    return (o, (k, v, log_f)) if output_past else o


def _extend(past: Past, k: torch.Tensor, v: torch.Tensor, log_f: torch.Tensor):
    if not isinstance(past, (tuple, list)) or len(past) != 3:
        raise ValueError("forgetting_attention: past must be a (k_prev, v_prev, log_f_prev) triple")
    k0, v0, f0 = past
    B, _, H, D = k.shape
    T0 = k0.shape[1] if k0.ndim == 4 else -1
    if (tuple(k0.shape) != (B, T0, H, D) or tuple(v0.shape) != (B, T0, H, v.shape[-1])
            or tuple(f0.shape) != (B, T0, H)):
        raise ValueError(f"forgetting_attention: past must be k [B, T0, H, D], v [B, T0, H, Dv], log_f "
                         f"[B, T0, H] matching the new inputs; got {list(k0.shape)}, {list(v0.shape)}, "
                         f"{list(f0.shape)}")
    return torch.cat((k0, k), 1), torch.cat((v0, v), 1), torch.cat((f0, log_f), 1)


def _torch(q, k, v, log_f, scale, block_q, block_k, *, docs):
    dt, out_dtype = _compute_dtype(q.dtype), q.dtype
    q, k, v = (x.to(dt).transpose(1, 2).contiguous() for x in (q, k, v))  # (B, H, T·, ·)
    # c grows linearly with T: it stays float64, and each tile subtracts a nearby reference before rounding,
    # so c_i − c_j of nearby steps keeps its digits at any T.
    # Documents are cut by masking pairs of different documents, not by log f = −∞ at a document's first token.
    # Both give the same attention, but −∞ in log f makes c −∞ from the first start on, and c_i − c_j (and every
    # tile's reference subtraction) −∞ − (−∞) = NaN inside later documents; the mask keeps c finite and exact
    # in float64, keeps the gates' gradients finite, and lets whole tiles between documents be skipped.
    c = log_f.to(torch.float64).cumsum(1).transpose(1, 2).contiguous()  # (B, H, Tk)
    q_doc = k_doc = None
    if docs is not None:
        q_doc = docs.doc_ids  # (B, Tq)
        k_doc = F.pad(q_doc, (k.shape[2] - q.shape[2], 0))  # (B, Tk)  past keys: the row's first piece
    o = _BlockwiseForgettingAttention.apply(q, k, v, c, scale, block_q, block_k, q_doc, k_doc)  # (B, H, Tq, Dv)
    return o.transpose(1, 2).to(out_dtype)  # (B, Tq, H, Dv)


def _tiles(Tq: int, Tk: int, block_q: int, block_k: int, *, q_doc: torch.Tensor | None = None,
           k_doc: torch.Tensor | None = None):
    """Yield (i0, i1, [(j0, j1, needs_mask, mixes_docs), ...]) over causal tiles; query i sits at key position
    Tk−Tq+i. With document ids q_doc (B, Tq), k_doc (B, Tk), both non-decreasing in time, tiles whose keys
    precede the queries' documents in every row are left out, and mixes_docs says whether the tile holds a
    pair of different documents in some row (else it needs no document mask)."""
    off = Tk - Tq
    if q_doc is not None:
        q_doc, k_doc = q_doc.cpu(), k_doc.cpu()  # one host read per call: the tile plan is made in Python
    for i0 in range(0, Tq, block_q):
        i1 = min(i0 + block_q, Tq)
        last = off + i1  # keys [0, last) are visible to some query of this block
        tiles = []
        for j0 in range(0, last, block_k):
            j1 = min(j0 + block_k, last)
            if q_doc is None:
                tiles.append((j0, j1, j1 - 1 > off + i0, False))
            elif bool((k_doc[:, j1 - 1] >= q_doc[:, i0]).any()):
                tiles.append((j0, j1, j1 - 1 > off + i0, bool((k_doc[:, j0] != q_doc[:, i1 - 1]).any())))
        yield i0, i1, tiles


def _tile_logits(qs, k, c, i0, i1, j0, j1, needs_mask, *, docs=None):
    """Scaled q·k plus c_i − c_j for one tile, −inf above the causal diagonal and, where docs = (q_doc, k_doc)
    is given, between documents. qs is q·scale."""
    off = c.shape[-1] - qs.shape[-2]
    ref = c[..., off + i0, None]  # (B, H, 1)  differences taken near the tile so float32 keeps them exact
    cq = (c[..., off + i0:off + i1] - ref).to(qs.dtype)  # (B, H, bq)
    ck = (c[..., j0:j1] - ref).to(qs.dtype)  # (B, H, bk)
    s = qs[..., i0:i1, :] @ k[..., j0:j1, :].transpose(-1, -2) + (cq[..., :, None] - ck[..., None, :])  # (B,H,bq,bk)
    hidden = None
    if needs_mask:
        qpos = torch.arange(off + i0, off + i1, device=s.device)
        kpos = torch.arange(j0, j1, device=s.device)
        hidden = kpos[None, :] > qpos[:, None]  # (bq, bk)
    if docs is not None:
        q_doc, k_doc = docs
        cross = q_doc[:, None, i0:i1, None] != k_doc[:, None, None, j0:j1]  # (B, 1, bq, bk)
        hidden = cross if hidden is None else hidden | cross
    # one pass over the tile for both masks
    return s if hidden is None else s.masked_fill(hidden, float("-inf"))


class _BlockwiseForgettingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, scale, block_q, block_k, q_doc, k_doc):
        # q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv), c (B, H, Tk) float64; q_doc (B, Tq), k_doc (B, Tk)
        # document ids or None
        B, H, Tq, _ = q.shape
        Tk = k.shape[2]
        qs = q * scale
        o = q.new_empty(B, H, Tq, v.shape[-1])  # (B, H, Tq, Dv)
        lse = q.new_empty(B, H, Tq)  # (B, H, Tq)  log-sum-exp per query, all backward needs
        for i0, i1, tiles in _tiles(Tq, Tk, block_q, block_k, q_doc=q_doc, k_doc=k_doc):
            m = q.new_full((B, H, i1 - i0), float("-inf"))  # (B, H, bq)  running max
            den = q.new_zeros(B, H, i1 - i0)  # (B, H, bq)
            acc = q.new_zeros(B, H, i1 - i0, v.shape[-1])  # (B, H, bq, Dv)
            for j0, j1, needs_mask, mixes_docs in tiles:
                docs = (q_doc, k_doc) if mixes_docs else None
                s = _tile_logits(qs, k, c, i0, i1, j0, j1, needs_mask, docs=docs)  # (B, H, bq, bk)
                m_new = torch.maximum(m, s.amax(-1))
                # without documents key 0 is in the first tile for every query, so m is finite from then on;
                # with them a row may see no key in a tile yet: subtract 0 there (exp(−inf) = 0, never NaN)
                m_ref = m_new if q_doc is None else m_new.masked_fill(m_new.isneginf(), 0.0)
                p = (s - m_ref[..., None]).exp()
                rescale = (m - m_ref).exp()
                den = den * rescale + p.sum(-1)
                acc = acc * rescale[..., None] + p @ v[..., j0:j1, :]
                m = m_new
            # every query sees its own key, so den > 0
            o[..., i0:i1, :] = acc / den[..., None]
            lse[..., i0:i1] = m + den.log()
        ctx.save_for_backward(q, k, v, c, o, lse, q_doc, k_doc)
        ctx.config = (scale, block_q, block_k)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, c, o, lse, q_doc, k_doc = ctx.saved_tensors
        scale, block_q, block_k = ctx.config
        qs = q * scale
        delta = (do * o).sum(-1)  # (B, H, Tq)  Σ_j p_ij dp_ij
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dc = torch.zeros(c.shape, dtype=q.dtype, device=q.device)  # (B, H, Tk)
        for i0, i1, tiles in _tiles(q.shape[2], k.shape[2], block_q, block_k, q_doc=q_doc, k_doc=k_doc):
            do_i = do[..., i0:i1, :]  # (B, H, bq, Dv)
            for j0, j1, needs_mask, mixes_docs in tiles:
                docs = (q_doc, k_doc) if mixes_docs else None
                s = _tile_logits(qs, k, c, i0, i1, j0, j1, needs_mask, docs=docs)  # (B, H, bq, bk)
                p = (s - lse[..., i0:i1, None]).exp()
                dv[..., j0:j1, :] += p.transpose(-1, -2) @ do_i
                ds = p * (do_i @ v[..., j0:j1, :].transpose(-1, -2) - delta[..., i0:i1, None])  # (B,H,bq,bk)
                dq[..., i0:i1, :] += ds @ k[..., j0:j1, :]
                dk[..., j0:j1, :] += ds.transpose(-1, -2) @ qs[..., i0:i1, :]
                # logit_ij has +c_i and −c_j; the +c_i part sums ds over a softmax row, which is exactly 0
                dc[..., j0:j1] -= ds.sum(-2)
        return dq * scale, dk, dv, dc.to(c.dtype), None, None, None, None, None


def _fla(q, k, v, log_f, scale):
    from fla.ops.forgetting_attn import parallel_forgetting_attn

    T0 = k.shape[1] - q.shape[1]
    if T0:
        # the kernel is square-causal: stand-in zero queries cover the past positions and are dropped
        q = torch.cat((q.new_zeros(q.shape[0], T0, *q.shape[2:]), q), 1)  # (B, T0+T, H, D)
    return parallel_forgetting_attn(q, k, v, log_f, scale=scale)[:, T0:]  # (B, T, H, Dv)


def _fla_varlen(q, k, v, log_f, scale, docs: DocumentMask):
    """fla's kernel on the rows flattened to one (1, B·T) sequence, cut into the pieces of `docs.cu_seqlens`."""
    from fla.ops.forgetting_attn import parallel_forgetting_attn

    B, T = docs.shape
    q, k, v, log_f = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, log_f))  # (1, B·T, H, ·)
    o = parallel_forgetting_attn(q, k, v, log_f, scale=scale, cu_seqlens=docs.cu_seqlens)  # (1, B·T, H, Dv)
    return o.view(B, T, *o.shape[2:])  # (B, T, H, Dv)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=16)
def _causal_block_mask(Tq: int, Tk: int, device: torch.device):
    """Block mask for queries at key positions Tk−Tq … Tk−1; it depends on the lengths only, so it is cached."""
    from torch.nn.attention.flex_attention import create_block_mask

    off = Tk - Tq

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + off

    # compiled on CUDA: the eager builder evaluates the mask on the full Tq × Tk grid
    return create_block_mask(causal, None, None, Tq, Tk, device=device, _compile=device.type == "cuda")


def _flex(q, k, v, log_f, scale, *, docs):
    from torch.nn.attention.flex_attention import flex_attention

    Tq, Tk = q.shape[1], k.shape[1]
    off = Tk - Tq
    c = log_f.float().cumsum(1).transpose(1, 2)  # (B, H, Tk)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + c[b, h, q_idx + off] - c[b, h, kv_idx]

    # unfused flex runs (forward only) off CUDA; on CUDA the compiled kernel is the point of this backend
    attend = _compiled_flex() if q.is_cuda else flex_attention
    block_mask = _causal_block_mask(Tq, Tk, q.device) if docs is None else docs.flex_block_mask(off)
    o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
               block_mask=block_mask, scale=scale)  # (B, H, Tq, Dv)
    return o.transpose(1, 2)  # (B, Tq, H, Dv)


__all__ = ["forgetting_attention"]
