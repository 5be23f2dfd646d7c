"""Mini-sequence training (MsT, Luo et al. 2024): the MLPs and the LM head + loss run in chunks of the sequence.

The (B, T, V) logits and the MLPs' (B, T, hidden) intermediates are the largest activations of long sequences.
`apply_minisequence(model, chunks)`
- runs each block's MLP over `chunks` pieces of the sequence, each checkpointed, so only its input is kept;
- replaces `model.loss` with `chunked_loss`: an autograd function that computes the cross-entropy one chunk of
  tokens at a time and never holds the full logits, recomputing each chunk's logits in backward.
Under tensor parallelism the head is vocab-parallel: `chunked_vocab_parallel_loss` gathers the (small) hidden
state's sequence, then runs each chunk's local logits (n / chunks, V / tp) through the vocab-parallel
cross-entropy's all-reduces, and recomputes them in backward, so neither the full nor the local logits exist whole.
The MLP chunks run inside the MLP's TP hooks, on the whole (gathered) sequence: RWKV-7's token shift needs the
neighbouring token across sequence shards. Under SP each chunk's output is reduce-scattered by the row-parallel
projection and gathered again to be joined (an all-reduce's volume per MLP, no extra activation memory to speak of).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.utils.checkpoint import checkpoint

from parallel.tensor import (vocab_parallel_logits_grad, vocab_parallel_loss_sum, vocab_parallel_softmax_parts,
                             vocab_shard_start)
from pretrain.models.common import IGNORE_INDEX, at_least_fp32


def _chunk_slices(n: int, chunks: int) -> list[slice]:
    size = math.ceil(n / chunks)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _loss_sum(lm_head: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy over labels != -100 of rows h (n, d), in fp32 or wider like `LanguageModel.loss`."""
    return F.cross_entropy(at_least_fp32(lm_head(h)), labels, ignore_index=IGNORE_INDEX, reduction="sum")


class _ChunkedLoss(torch.autograd.Function):
    """Mean cross-entropy of lm_head(h) over valid labels, `chunks` row blocks at a time; peak ~ (n / chunks, V)."""

    @staticmethod
    def forward(ctx, h, labels, lm_head, chunks, *params):  # h (N, d), labels (N,); params: lm_head's, for grads
        ctx.slices = _chunk_slices(h.shape[0], chunks)
        ctx.lm_head = lm_head
        # backward recomputes the logits: under the same autocast as now, so they match the forward's
        ctx.autocast = (h.device.type, torch.is_autocast_enabled(h.device.type),
                        torch.get_autocast_dtype(h.device.type))
        total = sum(_loss_sum(lm_head, h[s], labels[s]) for s in ctx.slices)
        count = (labels != IGNORE_INDEX).sum()
        ctx.save_for_backward(h, labels, count)
        return total / count  # 0 / 0 = nan without valid labels, as F.cross_entropy gives

    @staticmethod
    def backward(ctx, grad_loss):
        h, labels, count = ctx.saved_tensors
        params = [p for p in ctx.lm_head.parameters()]
        grad_h = torch.empty_like(h)
        grad_params = [None] * len(params)
        device_type, enabled, dtype = ctx.autocast
        scale = grad_loss / count.clamp(min=1)  # no labels: 0, not 0/0 (cp's global mean sends grad_loss = 0)
        for s in ctx.slices:
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                h_chunk = h[s].detach().requires_grad_()
                loss = _loss_sum(ctx.lm_head, h_chunk, labels[s]) * scale
            grads = torch.autograd.grad(loss, [h_chunk, *params])
            grad_h[s] = grads[0]
            grad_params = [g if acc is None else acc + g for acc, g in zip(grad_params, grads[1:])]
        return grad_h, None, None, None, *grad_params


def chunked_loss(lm_head: nn.Module, h: torch.Tensor, labels: torch.Tensor, *, chunks: int) -> torch.Tensor:
    """Mean cross-entropy of lm_head(h) over labels != -100 (h (B, T, d), labels (B, T)) without full logits."""
    params = [p for p in lm_head.parameters()]  # looked up per call: FSDP swaps in its gathered parameters
    return _ChunkedLoss.apply(h.flatten(0, 1), labels.flatten(), lm_head, chunks, *params)


class _ChunkedVocabParallelLoss(torch.autograd.Function):
    """`_ChunkedLoss` over a vocab-sharded head: h (N, d) is the whole sequence on every rank, weight this rank's
    (V_local, d) rows; the gradient of h it returns is this rank's share, which the caller sums over the ranks."""

    @staticmethod
    def forward(ctx, h, labels, weight, chunks, vocab_start, group):
        ctx.slices = _chunk_slices(h.shape[0], chunks)
        ctx.vocab_start, ctx.group = vocab_start, group
        ctx.autocast = (h.device.type, torch.is_autocast_enabled(h.device.type),
                        torch.get_autocast_dtype(h.device.type))
        total = torch.zeros((), device=h.device)
        for s in ctx.slices:
            logits = at_least_fp32(F.linear(h[s], weight))  # (n, V_local)
            shifted, sum_exp = vocab_parallel_softmax_parts(logits, group)
            total = total + vocab_parallel_loss_sum(shifted, sum_exp, labels[s], vocab_start=vocab_start, group=group)
        count = (labels != IGNORE_INDEX).sum()
        ctx.save_for_backward(h, labels, weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        h, labels, weight, count = ctx.saved_tensors
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        device_type, enabled, dtype = ctx.autocast
        scale = grad_loss / count.clamp(min=1)  # no labels: 0, not 0/0 (cp's global mean sends grad_loss = 0)
        for s in ctx.slices:
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                h_chunk, w = h[s].detach().requires_grad_(), weight.detach().requires_grad_()
                logits = at_least_fp32(F.linear(h_chunk, w))  # (n, V_local), recomputed
            with torch.no_grad():
                shifted, sum_exp = vocab_parallel_softmax_parts(logits, ctx.group)
                grad_logits = vocab_parallel_logits_grad(shifted, sum_exp, labels[s], vocab_start=ctx.vocab_start,
                                                         scale=scale)
            grads = torch.autograd.grad(logits, [h_chunk, w], grad_logits)
            grad_h[s] = grads[0]
            grad_w += grads[1]
        return grad_h, None, grad_w, None, None, None


def chunked_vocab_parallel_loss(lm_head: nn.Module, h: DTensor, labels: torch.Tensor, *,
                                chunks: int) -> torch.Tensor:
    """`chunked_loss` for a vocab-parallel (`Shard(0)` weight, no bias) head; h is the residual-stream DTensor."""
    weight = lm_head.weight  # looked up per call, as in `chunked_loss`
    mesh = weight.device_mesh
    if h.placements[0].is_shard():  # SP: all-gather; backward reduce-scatters the ranks' partial gradients
        whole = h.redistribute(placements=[Replicate()])
    else:  # a no-op forward whose backward all-reduces the partial gradients
        whole = DTensor.from_local(h.to_local(), mesh, [Replicate()], run_check=False)
    h_local = whole.to_local(grad_placements=[Partial()])  # (B, T, d): each rank back-propagates its vocabulary
    start = vocab_shard_start(weight.shape[0], mesh.size(), mesh.get_local_rank())
    return _ChunkedVocabParallelLoss.apply(h_local.flatten(0, 1), labels.flatten(), weight.to_local(), chunks,
                                           start, mesh.get_group())


def _chunked_forward(forward, chunks: int, x: torch.Tensor, docs=None) -> torch.Tensor:
    """forward(x, docs) over `chunks` pieces of x (B, T, d) along T, each checkpointed; x may be a `Replicate()`
    DTensor. `docs` (document masking's `DocumentMask`) is cut into the same pieces."""
    outs = []
    for s in _chunk_slices(x.shape[1], chunks):
        # one token of left context: RWKV-7's channel mix shifts its input by one token
        lo = max(s.start - 1, 0)
        piece_docs = None if docs is None else docs.piece(x, lo, s.stop)
        y = checkpoint(forward, x[:, lo:s.stop], docs=piece_docs, use_reentrant=False)  # (B, s.stop - lo, d)
        outs.append(y[:, s.start - lo:])
    return torch.cat(outs, dim=1)  # (B, T, d)


def apply_minisequence(model: nn.Module, chunks: int) -> None:
    """Run `model`'s MLPs and its LM head + loss in `chunks` pieces of the sequence, in place; 1 = off."""
    if chunks == 1:
        return
    for block in model.layers.values():
        block.mlp.forward = functools.partial(_chunked_forward, block.mlp.forward, chunks)
    if model.lm_head is not None:
        # applied after tensor parallelism and before data parallelism: a DTensor head here is vocab-parallel
        loss = chunked_vocab_parallel_loss if isinstance(model.lm_head.weight, DTensor) else chunked_loss
        model.loss = functools.partial(loss, model.lm_head, chunks=chunks)
