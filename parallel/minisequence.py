"""Mini-sequence training (MsT, Luo et al. 2024): the MLPs and the LM head + loss run in chunks of the sequence.

The (B, T, V) logits and the MLPs' (B, T, hidden) intermediates are the largest activations of long sequences.
`apply_minisequence(model, chunks)`
- runs each block's MLP over `chunks` pieces of the sequence, each checkpointed, so only its input is kept;
- replaces `model.loss` with `chunked_loss`: an autograd function that computes the cross-entropy one chunk of
  tokens at a time and never holds the full logits, recomputing each chunk's logits in backward.
Not yet under tensor parallelism (vocab-parallel head, sequence-sharded residual): it raises there.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_slices(n: int, chunks: int) -> list[slice]:
    size = math.ceil(n / chunks)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _loss_sum(lm_head: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy over labels != -100 of rows h (n, d), in fp32 like `LanguageModel.loss`."""
    return F.cross_entropy(lm_head(h).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


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
        scale = grad_loss / count
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


def _chunked_forward(forward, chunks: int, x: torch.Tensor) -> torch.Tensor:
    """forward(x) over `chunks` pieces of x (B, T, d) along T, each checkpointed."""
    outs = []
    for s in _chunk_slices(x.shape[1], chunks):
        # one token of left context: RWKV-7's channel mix shifts its input by one token
        lo = max(s.start - 1, 0)
        y = checkpoint(forward, x[:, lo:s.stop], use_reentrant=False)  # (B, s.stop - lo, d)
        outs.append(y[:, s.start - lo:])
    return torch.cat(outs, dim=1)  # (B, T, d)


def apply_minisequence(model: nn.Module, chunks: int) -> None:
    """Run `model`'s MLPs and its LM head + loss in `chunks` pieces of the sequence, in place; 1 = off."""
    if chunks == 1:
        return
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("mini-sequence chunking does not support tensor parallelism yet; "
                         "apply it to a model without tensor-parallel (DTensor) parameters")
    for block in model.layers.values():
        block.mlp.forward = functools.partial(_chunked_forward, block.mlp.forward, chunks)
    if model.lm_head is not None:
        model.loss = functools.partial(chunked_loss, model.lm_head, chunks=chunks)
