"""Context parallelism (CP): every sequence split over the N ranks of a cp group, through every layer.

Layout ("zigzag"). A row of T steps (T divisible by 2N) is cut into 2N chunks of Tc = T / (2N) steps; cp rank r
holds global chunks r and 2N−1−r, concatenated in that order, as its local sequence of T_loc = 2·Tc steps. Under
causal attention chunk c has c + ½ chunks of work, so every rank gets (r + ½) + (2N−1−r + ½) = 2N chunks' worth:
the same work on every rank. The linear mixers use the same layout, so one model can mix both kinds of layer.
`ContextShard` holds the group and does the cutting (`split`, `gather`, `positions`).

Mechanisms.
- Softmax and forget-gate (FoX) attention: ring attention (`ring_attention`). Each rank keeps its queries; the
  key/value blocks (with the global document ids of their steps and, for FoX, their global cumulative log
  forget values c_j) travel the ring with async P2P, the next transfer posted before the current block is
  computed. A (query chunk, key chunk) pair is skipped when the key chunk is later, fully visible when earlier,
  causal on the diagonal, and masked where global document ids differ. Partial results merge online through
  their running max and sum (their log-sum-exp). The backward is a custom autograd Function that recomputes
  each block's probabilities from (q, k_j, v_j, o, lse) with the flash-attention formulas; the dK/dV (and dc_j)
  accumulators travel the ring behind their blocks and reach home after N hops. FoX's c is the global prefix
  sum of log f: a per-chunk cumsum plus an offset from an exclusive scan of chunk totals in global chunk order
  (one differentiable all-gather of (B, H) totals per chunk, so the offsets' gradients reach earlier chunks'
  gates on other ranks). The tile loops run in fp32 (fp64 stays fp64); c stays fp64 and each tile subtracts a
  nearby reference before rounding, as `pretrain.ops.forgetting_attention` does. Memory is bounded by tiling
  queries (`block_q` queries × one key chunk per tile).
- GLA and RWKV-7: state passing (`gla_context`, `rwkv7_context`). The local (B, T_loc) is viewed as (2B, Tc)
  rows, one per chunk, so one op call runs both chunks. A chunk's final state is affine in its initial one,
  S_out = M·S_in + S_loc (GLA: M = Diag(e^{Σg}) per key channel; RWKV-7: M = A_Tc…A_1 with A_t = Diag(e^{w_t}) +
  b_t a_tᵀ, K×K per head; a document start inside the chunk makes M = 0), and so is every output,
  o_t = o_t(0) + R_t·S_in. One op call gives all of it: values [v | 0] with initial state [0 | I] (K identity
  columns) return [S_loc | M] as the final state and [o(0) | R] as the output, under the op's own recurrence
  and document masking. One all-gather of (S_loc, M) over cp (GLA: M's diagonal only), then every rank chains
  S_in(c) = M(c−1)·S_in(c−1) + S_loc(c−1), S_in(0) = 0, over the 2N chunks in global order in fp32 (or wider)
  and adds R·S_in to its outputs. Reading R off the identity columns (rather than rerunning the op from S_in)
  costs K more value columns in one call instead of a second call, needs no copy of the ops' masking rules,
  and works unchanged on fla's kernels; autograd carries S_in's gradient back through the chain and the
  all-gather to the earlier chunks' ranks.
- Token shifts (`previous_steps`): a one-token halo: one small all-gather of every rank's two chunk ends.

Costs per layer per rank (elements; B rows, H heads, D head dim, K×V states).
- Ring attention: forward (N−1)·2·B·T_loc·H·D sent (k and v pass N−1 hops; FoX adds (N−1)·B·T_loc·H fp64 c
  values, documents (N−1)·B·T_loc int64 ids), backward about twice that (k, v, c and ids again over N−1 hops,
  plus the dK | dV (| dc) accumulators' N hops). Compute is causal attention's own, split evenly.
  `bench/context.py` counts these at the call sites.
- State passing: one all-gather of the 2 chunk states (S_loc, M) per rank, 2·B·H·K·(V+1) (GLA) or
  2·B·H·K·(V+K) (RWKV-7) elements from every rank, and a reduce of the same size in backward. The op runs once,
  with V+K value columns instead of V. The chain is 2N small matmuls, the same on every rank.
- Documents (ring attention): one all-gather of (B, 2, 2) per-chunk start counts and one host read of a
  (2N, 2N) table per DocumentMask (cached on the mask, so per forward, not per layer); key chunks that share no
  document with a query chunk in any row are not computed.

Devices. Every collective runs on gloo and NCCL alike (reduce-scatter where the backend has it, else all-reduce
and a slice). The ring's tile loop is the torch path everywhere for now, CUDA included (no fused kernel
returning the log-sum-exp is wired in yet); the linear mixers' calls take `impl` and so use fla's kernels on
CUDA. torch's own `torch.distributed.tensor.experimental.context_parallel` is not used: it patches SDPA calls
and shards buffers itself, and it has neither a document mask nor an additive score bias (FoX's c_i − c_j), so
it could serve only the unmasked softmax case, under another layout contract than the other three mixers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from pretrain.ops import DocumentMask, gla, rwkv7
from pretrain.ops.documents import check_docs


@dataclass(frozen=True)
class ContextShard:
    """This process's place in the cp group: which two zigzag chunks of every sequence it holds."""

    group: dist.ProcessGroup
    """the cp process group"""
    rank: int
    """this process's rank in the group"""
    size: int
    """N, the number of cp ranks"""

    @classmethod
    def from_group(cls, group: dist.ProcessGroup) -> ContextShard:
        """This process's shard of the given cp group."""
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    @property
    def chunks(self) -> tuple[int, int]:
        """Global indices of the two chunks this rank holds, in local order."""
        return self.rank, 2 * self.size - 1 - self.rank

    def chunk_len(self, T: int) -> int:
        """Tc = T / (2N) for a full sequence of T steps; ValueError when T is not divisible by 2N."""
        n = 2 * self.size
        if T % n:
            raise ValueError(f"context parallelism cuts a sequence of T = {T} steps into 2N = {n} chunks "
                             f"(N = {self.size} cp ranks); T must be divisible by 2N = {n}")
        return T // n

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full sequence along dim → this rank's local one (chunks r and 2N−1−r), a copy."""
        Tc = self.chunk_len(x.shape[dim])
        first, second = self.chunks
        return torch.cat((x.narrow(dim, first * Tc, Tc), x.narrow(dim, second * Tc, Tc)), dim)

    def gather(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's local sequence → the full one, all-gathered over cp (no autograd: eval and tests)."""
        parts = [torch.empty_like(x_local) for _ in range(self.size)]
        dist.all_gather(parts, x_local.contiguous(), group=self.group)
        halves = [p.chunk(2, dim) for p in parts]  # rank s: (chunk s, chunk 2N−1−s)
        ordered = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
        return torch.cat(ordered, dim)

    def positions(self, T: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(T_loc,) int64: the global step index of each local step of a T-step sequence."""
        Tc = self.chunk_len(T)
        return torch.cat([torch.arange(c * Tc, (c + 1) * Tc, device=device) for c in self.chunks])


# --------------------------------------------------------------------------------------------------------------
# Differentiable collectives


class _AllGather(torch.autograd.Function):
    """x → (N, *x.shape) stacked over the group; backward: the summed gradient's slice of this rank (every rank
    used the gathered tensor, so each slot's gradient is the sum over ranks). CPU tensors go through gloo, which
    has neither all_gather_into_tensor everywhere nor reduce_scatter: list all-gather, and all-reduce + slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        n = dist.get_world_size(group)
        if x.device.type == "cpu":
            parts = [torch.empty_like(x) for _ in range(n)]
            dist.all_gather(parts, x, group=group)
            return torch.stack(parts)
        out = x.new_empty(n, *x.shape)
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        grad = grad.contiguous()
        if grad.device.type == "cpu":
            grad = grad.clone()
            dist.all_reduce(grad, group=group)
            return grad[dist.get_rank(group)], None
        out = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


def _all_gather(x: torch.Tensor, shard: ContextShard) -> torch.Tensor:
    if shard.size == 1:
        return x.unsqueeze(0)
    return _AllGather.apply(x, shard.group)


def _in_global_order(per_rank: torch.Tensor) -> torch.Tensor:
    """(N, 2, ...) per rank and local chunk → (2N, ...) in global chunk order (chunk c < N is rank c's first,
    chunk c ≥ N rank 2N−1−c's second)."""
    return torch.cat((per_rank[:, 0], per_rank[:, 1].flip(0)))


def _exclusive_cumsum(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    c = x.cumsum(dim)
    return torch.cat((torch.zeros_like(c.narrow(dim, 0, 1)), c.narrow(dim, 0, c.shape[dim] - 1)), dim)


def _check_local_len(T_loc: int, shard: ContextShard, op: str) -> int:
    if T_loc % 2 or T_loc == 0:
        raise ValueError(f"{op}: the local sequence holds two equal chunks, so T_loc must be even and positive; "
                         f"got T_loc = {T_loc} (cut the full sequence with ContextShard.split)")
    return T_loc // 2


@dataclass(frozen=True)
class _DocumentPlan:
    """Global document ids of the local steps, and which (query chunk, key chunk) pairs some row can see."""

    ids: torch.Tensor
    """(B, T_loc) int64: each local step's document index over the whole row (equal ids = one document)"""
    visible: tuple[tuple[bool, ...], ...]
    """[query chunk][key chunk], global indices: the key chunk is not later and shares a document with the
    query chunk in at least one row"""


# one plan per DocumentMask (built once per forward, shared by every layer) and cp group: the all-gather and the
# host read happen once per forward, not once per layer
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _document_plan(docs: DocumentMask, shard: ContextShard) -> _DocumentPlan:
    """This rank's `_DocumentPlan` for `docs`, cached per mask: one all-gather of chunk summaries and one host read
    of the (2N, 2N) table per forward (not per layer). The table stays device-built: the loader's whole rows are on
    the host only before `ParallelModel.local_batch`, and a pipeline schedule re-splits the batch into micro-batches
    that only tensors survive, so a host-built table would need its own path into every stage's mask."""
    key = (shard.group, shard.rank, shard.size)
    cached = _plans.get(docs, {}).get(key)
    if cached is not None:
        return cached
    B, T_loc = docs.shape
    per_chunk = docs.starts.long().reshape(B, 2, T_loc // 2)  # (B, 2, Tc)
    summary = torch.stack((per_chunk.sum(-1), per_chunk[..., 0]), 0).permute(2, 0, 1).contiguous()  # (2, 2, B)
    if shard.size == 1:
        gathered = summary.unsqueeze(0)
    else:
        parts = [torch.empty_like(summary) for _ in range(shard.size)]
        dist.all_gather(parts, summary, group=shard.group)
        gathered = torch.stack(parts)  # (N, 2, 2, B)  [rank, local chunk, (starts, first step is one), row]
    counts, first_is_start = _in_global_order(gathered).unbind(1)  # (2N, B) each
    offsets = _exclusive_cumsum(counts)  # (2N, B)  starts before each chunk
    mine = offsets[list(shard.chunks)].transpose(0, 1)  # (B, 2)
    ids = (per_chunk.cumsum(-1) + mine[..., None]).view(B, T_loc)  # (B, T_loc)
    first_id, last_id = offsets + first_is_start, offsets + counts  # (2N, B)
    # ids never decrease, so chunk kc ≤ qc shares a document with chunk qc exactly when its last id reaches
    # qc's first one; one host read of a (2N, 2N) table per forward
    shares = (last_id[None, :, :] >= first_id[:, None, :]).any(-1)  # (2N, 2N)  [query chunk, key chunk]
    visible = tuple(tuple(row) for row in shares.tril().cpu().tolist())
    plan = _DocumentPlan(ids, visible)
    _plans.setdefault(docs, {})[key] = plan
    return plan


def _global_log_forget_cumsum(log_f: torch.Tensor, shard: ContextShard) -> torch.Tensor:
    """c = cumsum of log f over the whole row, at the local steps: (B, T_loc, H) → (B, H, T_loc) float64,
    differentiable (the offsets' gradients reach the earlier chunks' gates through the all-gather)."""
    B, T_loc, H = log_f.shape
    local = log_f.to(torch.float64).transpose(1, 2).unflatten(-1, (2, T_loc // 2)).cumsum(-1)  # (B, H, 2, Tc)
    totals = local[..., -1].permute(2, 0, 1)  # (2, B, H)
    offsets = _exclusive_cumsum(_in_global_order(_all_gather(totals, shard)))  # (2N, B, H)
    mine = offsets[list(shard.chunks)].permute(1, 2, 0)  # (B, H, 2)
    return (local + mine[..., None]).flatten(-2)  # (B, H, T_loc)


# --------------------------------------------------------------------------------------------------------------
# Ring attention


class _Ring:
    """Async P2P to the next cp rank and from the previous one (global ranks resolved once)."""

    def __init__(self, shard: ContextShard):
        self.group = shard.group
        self.next = dist.get_global_rank(shard.group, (shard.rank + 1) % shard.size)
        self.prev = dist.get_global_rank(shard.group, (shard.rank - 1) % shard.size)

    def shift(self, tensors, *, tag: int):
        """Post sends of tensors to the next rank and receives of same-shaped ones from the previous;
        returns (receive buffers, requests to wait on)."""
        ops, received = [], []
        for i, t in enumerate(tensors):
            buf = torch.empty_like(t)
            ops.append(dist.P2POp(dist.isend, t, self.next, self.group, tag=tag + i))
            ops.append(dist.P2POp(dist.irecv, buf, self.prev, self.group, tag=tag + i))
            received.append(buf)
        return received, dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for req in requests:
        req.wait()


def _block_pairs(q_chunks, k_chunks, Tc, visible):
    """(query offset, key offset, causal) for the visible (query chunk, key chunk) pairs of two local sequences
    given their global chunk indices: a later key chunk is invisible, and so, under documents, is one that
    shares no document with the query chunk in any row (visible: the plan's table, or None)."""
    for qi, qc in enumerate(q_chunks):
        for ki, kc in enumerate(k_chunks):
            if kc <= qc and (visible is None or visible[qc][kc]):
                yield qi * Tc, ki * Tc, kc == qc


def _tile_logits(qs, k, c_q, c_k, doc_q, doc_k, causal_from):
    """Scaled q·k (+ c_i − c_j) of one tile, −inf where hidden. qs (B, H, bq, D), k (B, H, bk, D); c_q (B, H, bq),
    c_k (B, H, bk) float64 or None; doc_q (B, bq), doc_k (B, bk) or None; causal_from: the query tile's first
    step within a diagonal block (keys after a query are hidden), or None for a fully visible block."""
    s = qs @ k.transpose(-1, -2)  # (B, H, bq, bk)
    if c_q is not None:
        ref = c_q[..., :1]  # (B, H, 1)  differences taken near the tile so fp32 keeps them
        s = s + ((c_q - ref).to(s.dtype)[..., :, None] - (c_k - ref).to(s.dtype)[..., None, :])
    hidden = None
    if causal_from is not None:
        qpos = torch.arange(causal_from, causal_from + s.shape[-2], device=s.device)
        hidden = torch.arange(s.shape[-1], device=s.device)[None, :] > qpos[:, None]  # (bq, bk)
    if doc_q is not None:
        cross = doc_q[:, None, :, None] != doc_k[:, None, None, :]  # (B, 1, bq, bk)
        hidden = cross if hidden is None else hidden | cross
    return s if hidden is None else s.masked_fill(hidden, float("-inf"))


def _tiles(Tc: int, block_q: int, causal: bool):
    """(query tile start, end, key end) within one block pair: a diagonal tile needs keys up to its last query."""
    for i0 in range(0, Tc, block_q):
        i1 = min(i0 + block_q, Tc)
        yield i0, i1, (i1 if causal else Tc)


def _scored_tiles(qs, c, doc, block, *, src: int, shard: ContextShard, visible, block_q: int):
    """(query rows, key columns, logits (B, H, bq, bk)) of every tile this rank computes against the ring `block`
    (k, v[, c][, doc]) that started on rank `src`: the forward's and the backward's shared walk over block pairs."""
    k_b = block[0]
    c_b = block[2] if c is not None else None
    doc_b = block[-1] if doc is not None else None
    Tc = qs.shape[-2] // 2
    for q0, k0, causal in _block_pairs(shard.chunks, (src, 2 * shard.size - 1 - src), Tc, visible):
        for i0, i1, kn in _tiles(Tc, block_q, causal):
            rows, keys = slice(q0 + i0, q0 + i1), slice(k0, k0 + kn)
            yield rows, keys, _tile_logits(qs[..., rows, :], k_b[..., keys, :],
                                           None if c is None else c[..., rows], None if c is None else c_b[..., keys],
                                           None if doc is None else doc[:, rows],
                                           None if doc is None else doc_b[:, keys], i0 if causal else None)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, doc, visible, shard, scale, block_q):
        # q, k (B, H, T_loc, D), v (B, H, T_loc, Dv) in the compute dtype; c (B, H, T_loc) float64 or None;
        # doc (B, T_loc) global document ids or None
        B, H, T_loc, _ = q.shape
        ring = _Ring(shard) if shard.size > 1 else None
        qs = q * scale
        m = q.new_full((B, H, T_loc), float("-inf"))  # running max of the logits
        den = q.new_zeros(B, H, T_loc)  # running Σ exp(logit − m)
        acc = q.new_zeros(B, H, T_loc, v.shape[-1])  # running Σ exp(logit − m) v
        block = [t for t in (k, v, c, doc) if t is not None]
        for step in range(shard.size):
            src = (shard.rank - step) % shard.size
            if step < shard.size - 1:  # the next block is on its way while this one is computed
                incoming, requests = ring.shift(block, tag=0)
            v_b = block[1]
            for rows, keys, s in _scored_tiles(qs, c, doc, block, src=src, shard=shard, visible=visible,
                                               block_q=block_q):
                m_old = m[..., rows]
                m_new = torch.maximum(m_old, s.amax(-1))  # (B, H, bq)
                # without documents every query sees a key in every tile computed; with them a row may see
                # none yet (m = −inf): subtract 0 there, never −inf − −inf
                m_ref = m_new if doc is None else m_new.masked_fill(m_new.isneginf(), 0.0)
                p = (s - m_ref[..., None]).exp()  # (B, H, bq, bk)
                rescale = (m_old - m_ref).exp()
                den[..., rows] = den[..., rows] * rescale + p.sum(-1)
                acc[..., rows, :] = acc[..., rows, :] * rescale[..., None] + p @ v_b[..., keys, :]
                m[..., rows] = m_new
            if step < shard.size - 1:
                _wait(requests)
                block = incoming
        # every query sees its own key (the diagonal block, step 0), so den > 0
        o = acc / den[..., None]  # (B, H, T_loc, Dv)
        lse = m + den.log()  # (B, H, T_loc)
        ctx.save_for_backward(q, k, v, c, doc, o, lse)
        ctx.config = (visible, shard, scale, block_q)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, c, doc, o, lse = ctx.saved_tensors
        visible, shard, scale, block_q = ctx.config
        B, H, T_loc, D = q.shape
        Dv = v.shape[-1]
        ring = _Ring(shard) if shard.size > 1 else None
        do = do.contiguous()
        qs = q * scale
        delta = (do * o).sum(-1)  # (B, H, T_loc)  Σ_j p_ij dp_ij
        dq = torch.zeros_like(q)
        block = [t for t in (k, v, c, doc) if t is not None]
        grad_requests = grad_incoming = None
        for step in range(shard.size):
            src = (shard.rank - step) % shard.size
            if step < shard.size - 1:
                incoming, requests = ring.shift(block, tag=0)
            k_b, v_b = block[0], block[1]
            dk, dv = torch.zeros_like(k_b), torch.zeros_like(v_b)  # this rank's share of the block's gradients
            dc = None if c is None else q.new_zeros(B, H, T_loc)
            for rows, keys, s in _scored_tiles(qs, c, doc, block, src=src, shard=shard, visible=visible,
                                               block_q=block_q):
                p = (s - lse[..., rows, None]).exp()  # (B, H, bq, bk)
                do_i = do[..., rows, :]
                dv[..., keys, :] += p.transpose(-1, -2) @ do_i
                ds = p * (do_i @ v_b[..., keys, :].transpose(-1, -2) - delta[..., rows, None])
                dq[..., rows, :] += ds @ k_b[..., keys, :]
                dk[..., keys, :] += ds.transpose(-1, -2) @ qs[..., rows, :]
                if c is not None:
                    # the logit has +c_i − c_j; the +c_i part sums ds over a whole softmax row, exactly 0
                    dc[..., keys] -= ds.sum(-2)
            # one buffer travels for dk | dv | dc
            part = torch.cat((dk, dv) if c is None else (dk, dv, dc.unsqueeze(-1)), -1)  # (B, H, T_loc, width)
            if step == 0:
                total = part
            else:  # the block's accumulator, from the ranks it visited before, arrives behind it
                _wait(grad_requests)
                total = grad_incoming + part
            if shard.size > 1:
                (grad_incoming,), grad_requests = ring.shift([total], tag=16)
            if step < shard.size - 1:
                _wait(requests)
                block = incoming
        if shard.size > 1:  # after N hops this rank's own block's accumulator is home
            _wait(grad_requests)
            total = grad_incoming
        dk, dv = total[..., :D], total[..., D:D + Dv]
        dc = None if c is None else total[..., -1].to(c.dtype)
        return dq * scale, dk, dv, dc, None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, shard: ContextShard,
                   docs: DocumentMask | None = None, log_f: torch.Tensor | None = None, scale: float | None = None,
                   block_q: int = 128) -> torch.Tensor:
    """Causal softmax attention (log_f None) or forgetting attention (logits + c_i − c_j, c = cumsum log_f over
    the whole sequence) over a sequence split zigzag over the cp group; equals `causal_attention` /
    `forgetting_attention` on the whole sequence, then `shard.split`.

    q, k: [B, T_loc, H, D]; v: [B, T_loc, H, Dv]; log_f: [B, T_loc, H]; docs: the local (B, T_loc) mask whose
    starts are the real document starts. scale defaults to D^-0.5. block_q: queries per tile (memory bound).
    Returns [B, T_loc, H, Dv] in q's dtype.
    """
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"ring_attention wants q, k as [B, T_loc, H, D] and v as [B, T_loc, H, Dv]; got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if log_f is not None and tuple(log_f.shape) != tuple(q.shape[:3]):
        raise ValueError(f"ring_attention wants log_f as [B, T_loc, H] = {list(q.shape[:3])}; got "
                         f"{list(log_f.shape)}")
    if block_q <= 0:
        raise ValueError(f"ring_attention: block_q must be positive; got {block_q}")
    _check_local_len(q.shape[1], shard, "ring_attention")
    doc = visible = None
    if docs is not None:
        check_docs(docs, q, "ring_attention")
        plan = _document_plan(docs, shard)
        doc, visible = plan.ids, plan.visible  # (B, T_loc), [query chunk][key chunk]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dt = torch.promote_types(q.dtype, torch.float32)  # bf16/fp16 computed in fp32, fp64 stays fp64
    c = None if log_f is None else _global_log_forget_cumsum(log_f, shard)  # (B, H, T_loc)
    qh, kh, vh = (x.to(dt).transpose(1, 2).contiguous() for x in (q, k, v))  # (B, H, T_loc, ·)
    o = _RingAttention.apply(qh, kh, vh, c, doc, visible, shard, scale, block_q)  # (B, H, T_loc, Dv)
    return o.transpose(1, 2).to(q.dtype)  # (B, T_loc, H, Dv)


# --------------------------------------------------------------------------------------------------------------
# State passing


def _as_chunk_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, 2·Tc, ...) → (2B, Tc, ...): row j·B + b is row b's local chunk j."""
    B, T_loc = x.shape[:2]
    return x.unflatten(1, (2, T_loc // 2)).transpose(0, 1).flatten(0, 1)


def _from_chunk_rows(x: torch.Tensor) -> torch.Tensor:
    """(2B, Tc, ...) → (B, 2·Tc, ...), undoing `_as_chunk_rows`."""
    return x.unflatten(0, (2, x.shape[0] // 2)).transpose(0, 1).flatten(1, 2)


def chain_states(s_loc: torch.Tensor, trans: torch.Tensor, *, diagonal: bool) -> torch.Tensor:
    """Initial states of consecutive chunks from their zero-state final states and transitions:
    S_in(0) = 0, S_in(c) = M(c−1)·S_in(c−1) + S_loc(c−1).

    s_loc: (C, ..., K, V); trans: (C, ..., K, K), or (C, ..., K) with diagonal=True (M = Diag(trans)).
    Returns (C, ..., K, V) in s_loc's dtype.
    """
    state = torch.zeros_like(s_loc[0])
    entering = []
    for c in range(s_loc.shape[0]):
        entering.append(state)
        state = (trans[c][..., None] * state if diagonal else trans[c] @ state) + s_loc[c]
    return torch.stack(entering)


def _state_passing(op, inputs, v, *, shard, docs, diagonal, op_kwargs):
    """Run op (gla or rwkv7) over the zigzag-local sequence from the states left by all earlier chunks.

    inputs: the op's [B, T_loc, H, ·] arguments with v replaced by None (its slot); diagonal: the op's chunk
    transition is diagonal (GLA), so only its diagonal is gathered and chained."""
    B, T_loc, H, V = v.shape
    _check_local_len(T_loc, shard, op.__name__)
    K = inputs[0].shape[-1]
    rows = [None if x is None else _as_chunk_rows(x) for x in inputs]  # (2B, Tc, H, ·)
    v_rows = _as_chunk_rows(v)  # (2B, Tc, H, V)
    row_docs = None
    if docs is not None:
        check_docs(docs, v, op.__name__)
        row_docs = DocumentMask(_as_chunk_rows(docs.starts))  # (2B, Tc)

    # Values [v | 0] from the initial state [0 | I]: the first V columns run from a zero state (output o_0, final
    # state S_loc); the K identity columns carry the chunk's linear map alone, so their final state is M and
    # their output at step t is o_t's response to the initial state (r_t P_t, P_t = A_t…A_1; GLA: scale·q_t P_t).
    # Both come from the op's own recurrence and document masking, in one call.
    dt = torch.promote_types(v.dtype, torch.float32)
    v_ext = torch.cat((v_rows, v_rows.new_zeros(*v_rows.shape[:3], K)), -1)  # (2B, Tc, H, V+K)
    h0 = torch.cat((torch.zeros(K, V, dtype=dt, device=v.device), torch.eye(K, dtype=dt, device=v.device)), -1)
    call = [v_ext if x is None else x for x in rows]
    o_ext, final = op(*call, initial_state=h0.expand(2 * B, H, K, V + K).contiguous(), output_final_state=True,
                      docs=row_docs, **op_kwargs)  # (2B, Tc, H, V+K), (2B, H, K, V+K)
    final = final.to(torch.promote_types(final.dtype, torch.float32)).unflatten(0, (2, B))  # (2, B, H, K, V+K)
    # GLA's M is diagonal: only its diagonal travels
    trans = final[..., V:].diagonal(dim1=-2, dim2=-1) if diagonal else final[..., V:].flatten(-2)  # (2, B, H, K·)
    packed = torch.cat((final[..., :V].flatten(-2), trans), -1)  # (2, B, H, K·V + K or K·K)
    every = _in_global_order(_all_gather(packed, shard))  # (2N, B, H, K·V + K or K·K)
    s_loc = every[..., :K * V].unflatten(-1, (K, V))  # (2N, B, H, K, V)
    trans = every[..., K * V:] if diagonal else every[..., K * V:].unflatten(-1, (K, K))
    entering = chain_states(s_loc, trans, diagonal=diagonal)[list(shard.chunks)].flatten(0, 1)  # (2B, H, K, V)

    o_zero, response = o_ext.split((V, K), -1)  # (2B, Tc, H, V), (2B, Tc, H, K)
    o = o_zero + torch.einsum("bthk,bhkv->bthv", response.to(entering.dtype), entering).to(o_zero.dtype)
    return _from_chunk_rows(o)  # (B, T_loc, H, V)


def gla_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, shard: ContextShard,
                docs: DocumentMask | None = None, scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """`pretrain.ops.gla` over a sequence split zigzag over the cp group (state passing); equals the op on the
    whole sequence, then `shard.split`. q, k, g: [B, T_loc, H, K]; v: [B, T_loc, H, V]; docs: local (B, T_loc)."""
    return _state_passing(gla, (q, k, None, g), v, shard=shard, docs=docs, diagonal=True,
                          op_kwargs=dict(scale=scale, impl=impl))


def rwkv7_context(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor, *, shard: ContextShard, docs: DocumentMask | None = None,
                  impl: str = "auto") -> torch.Tensor:
    """`pretrain.ops.rwkv7` over a sequence split zigzag over the cp group (state passing); equals the op on the
    whole sequence, then `shard.split`. r, w, k, a, b: [B, T_loc, H, K]; v: [B, T_loc, H, V]."""
    return _state_passing(rwkv7, (r, w, k, None, a, b), v, shard=shard, docs=docs, diagonal=False,
                          op_kwargs=dict(impl=impl))


# --------------------------------------------------------------------------------------------------------------
# Token shift halo


def chunk_halo(x: torch.Tensor, *, shard: ContextShard) -> torch.Tensor:
    """The step before each of the two local chunks of a zigzag-local x (B, T_loc, ...) (a DTensor's local part),
    stacked (2, B, ...): zero before global step 0. One small all-gather of every rank's two chunk ends."""
    x = x.to_local() if isinstance(x, DTensor) else x
    Tc = _check_local_len(x.shape[1], shard, "previous_steps")
    ends = torch.stack((x[:, Tc - 1], x[:, -1]))  # (2, B, ...)  the last step of each local chunk
    every = _all_gather(ends, shard)  # (N, 2, B, ...)
    r, n = shard.rank, shard.size
    # local step 0 is global chunk r's first: its previous step ends chunk r − 1 (rank r − 1's first chunk)
    first = torch.zeros_like(x[:, 0]) if r == 0 else every[r - 1, 0]
    # local step Tc is chunk 2N−1−r's first: chunk 2N−2−r is rank r + 1's second chunk, or for r = N − 1 this
    # rank's own first chunk
    second = every[r, 0] if r == n - 1 else every[r + 1, 1]
    return torch.stack((first, second))  # (2, B, ...)


def previous_steps(x: torch.Tensor, *, shard: ContextShard,
                   piece: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
    """x_{t−1} at every local step of a zigzag-local x (B, T_loc, ...), zero at global step 0: the whole-sequence
    `shift_tokens(x)` (without docs), then split. The caller applies its own document "continues" mask.
    `piece` = (whole, halo, start): x is whole[:, start:start + n] (a mini-sequence piece) and halo its whole's
    `chunk_halo`, fetched once for all pieces: no collective then.

    A DTensor x (tensor parallelism: Replicate, or Shard on a trailing dim) is shifted on its local tensor and
    comes back as a DTensor with the same spec."""
    if isinstance(x, DTensor):
        if any(isinstance(p, Shard) and p.dim % x.ndim in (0, 1) for p in x.placements):
            raise ValueError(f"previous_steps shifts along the sequence (dim 1), so x may not be sharded on "
                             f"dims 0 or 1 over tp; got placements {x.placements}")
        local_piece = None if piece is None else (piece[0].to_local(), *piece[1:])
        shifted = previous_steps(x.to_local(), shard=shard, piece=local_piece)
        return DTensor.from_local(shifted, x.device_mesh, x.placements, run_check=False, shape=x.shape,
                                  stride=x.stride())
    whole, halo, start = (x, chunk_halo(x, shard=shard), 0) if piece is None else piece
    Tc = _check_local_len(whole.shape[1], shard, "previous_steps")
    # the chunks' first local steps (0 and Tc) take their previous step from the halo, the others from whole
    first = whole[:, start - 1] if start % Tc else halo[start // Tc]  # (B, ...)
    second = Tc - start  # where in x the second chunk starts
    if 0 < second < x.shape[1]:
        return torch.cat((first.unsqueeze(1), x[:, :second - 1], halo[1].unsqueeze(1), x[:, second:-1]), 1)
    return torch.cat((first.unsqueeze(1), x[:, :-1]), 1)


__all__ = ["ContextShard", "chain_states", "chunk_halo", "gla_context", "previous_steps", "ring_attention",
           "rwkv7_context"]
