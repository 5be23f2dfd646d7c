"""Context parallelism on the model side: `apply_cp(part, shard, documents=...)` makes a model (or a pipeline stage)
run on this cp rank's zigzag part of every sequence (the kernels are in `parallel/context.py`).

What changes, per piece of the model (everything else acts on each token alone and runs as it is):
- The document mask: `part.document_mask` builds a `ContextDocumentMask` from the position ids the trainer always
  passes under CP (global positions without document masking, the loader's in-document ids with it), so rotary and
  learned positions are the global ones on every rank. Its `previous_steps` fetches the step before each of the
  rank's two chunks from where it lives (`context.previous_steps`, a one-step halo), which `shift_tokens` uses:
  RWKV-7's time- and channel-mix token shifts and the Pro block's KV-shift. Its `continues` is "the previous step,
  wherever it lives, is in the same document".
- Each mixer's `attend` (its core op) becomes the CP op, chosen by the mixer's type: ring attention for the
  Transformer's `Attention` and FoX's `ForgettingAttention` (with the forget gate's `log_forget`), state passing for
  GLA and the RWKV-7 time mix. The projections, norms and gates around it are per token.
- The loss: each rank holds other tokens of the same rows, so the loss is Σ over the rank's labels / the count
  of labels ≠ −100 over all cp ranks (one all-reduce of two numbers per micro-step, no host sync). Its value is the
  true mean; its gradient is scaled by cp, since data parallelism averages gradients over dp × cp ranks where the
  one-process gradient is their sum over cp. It wraps `forward`, so the vocab-parallel (TP) and chunked (MsT) losses
  stay as they are underneath.
"""

from __future__ import annotations

import copy
from functools import cached_property, partial

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.context import ContextShard, chunk_halo, gla_context, previous_steps, ring_attention, rwkv7_context
from pretrain.models.common import IGNORE_INDEX
from pretrain.models.fox import ForgettingAttention
from pretrain.models.gla import GatedLinearAttention
from pretrain.models.rwkv7 import RWKV7TimeMix
from pretrain.models.transformer import Attention
from pretrain.ops.documents import DocumentMask


class ContextDocumentMask(DocumentMask):
    """The `DocumentMask` of this cp rank's local (B, T_loc) steps (two zigzag chunks of each row).

    `starts` are the real document starts, global step 0 included (the contract of `parallel.context`'s ops);
    `documents` says whether the run masks documents at all: without it the ops get no mask (the only start is
    global step 0, which needs none), while positions and token shifts still use this one."""

    def __init__(self, starts: torch.Tensor, position_ids: torch.Tensor | None, *, shard: ContextShard,
                 documents: bool, whole: tuple[ContextDocumentMask, torch.Tensor, int, int] | None = None):
        super().__init__(starts, position_ids)
        self.shard = shard
        self.documents = documents
        # a piece of a longer local sequence (mini-sequence chunks): (its mask, the whole input, start, stop)
        self._whole = whole

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, *, shard: ContextShard,
                          documents: bool) -> ContextDocumentMask:
        """From the local position ids (B, T_loc): in-document ids under document masking (0 at each start), else
        the global positions."""
        if position_ids is None:
            raise ValueError("under context parallelism the model needs position_ids (B, T_loc): the global positions "
                             "of this rank's steps (ContextShard.positions), or in-document ids under document masking")
        T = position_ids.shape[1] * shard.size
        global_step = shard.positions(T, position_ids.device)  # (T_loc,)
        starts = (position_ids == 0) | (global_step == 0)  # (B, T_loc): a row's global step 0 starts it
        return cls(starts, position_ids, shard=shard, documents=documents)

    @property
    def ops_mask(self) -> ContextDocumentMask | None:
        """What the CP ops get: this mask under document masking, else None (no start but global step 0)."""
        return self if self.documents else None

    @cached_property
    def continues(self) -> torch.Tensor:
        """(B, T_loc) bool: the previous step, on this rank or another, is in the same document."""
        return ~self.starts

    def previous_steps(self, x: torch.Tensor) -> torch.Tensor:
        """x_{t−1} of every local step of x (B, T_loc, ...) in global order, zero at global step 0."""
        if self._whole is None:
            return previous_steps(x, shard=self.shard)
        mask, whole, start, stop = self._whole
        if x.shape[1] != stop - start:
            raise ValueError(f"this mask covers steps {start}…{stop - 1} of a piece; got {x.shape[1]} steps")
        return previous_steps(x, shard=self.shard, piece=(whole, mask._halo_of(whole), start))

    def _halo_of(self, whole: torch.Tensor) -> torch.Tensor:
        """`chunk_halo(whole)` (2, B, ...), fetched once per forward for all the pieces cut from `whole` (and reused
        when a checkpointed piece runs again in backward, which then needs no collective)."""
        key = ("halo", id(whole))
        if key not in self._by_key:
            # whole is kept (no copy; the pieces hold it anyway) so that its id stays its own
            self._by_key[key] = (whole, chunk_halo(whole, shard=self.shard))
        return self._by_key[key][1]

    def piece(self, x: torch.Tensor, start: int, stop: int) -> ContextDocumentMask:
        """The mask of x[:, start:stop], cut from x (B, T_loc, ...): its first step's previous one comes from x's
        halo, wherever that lives."""
        positions = None if self.position_ids is None else self.position_ids[:, start:stop]
        return ContextDocumentMask(self.starts[:, start:stop], positions, shard=self.shard, documents=self.documents,
                                   whole=(self, x, start, stop))

    def slice(self, start: int, stop: int) -> DocumentMask:
        raise NotImplementedError("a piece of a context-parallel sequence needs the tensor it is cut from, to find "
                                  "its previous steps; use ContextDocumentMask.piece(x, start, stop)")

    def rows(self, start: int, stop: int) -> ContextDocumentMask:
        if self._whole is not None:
            raise NotImplementedError("rows of a piece of a context-parallel sequence")
        positions = None if self.position_ids is None else self.position_ids[start:stop]
        return ContextDocumentMask(self.starts[start:stop], positions, shard=self.shard, documents=self.documents)

    def with_continues(self, continues: torch.Tensor) -> ContextDocumentMask:
        other = copy.copy(self)
        other.__dict__["continues"] = continues
        return other


def _mask_for_ops(docs: DocumentMask | None) -> DocumentMask | None:
    return docs.ops_mask if isinstance(docs, ContextDocumentMask) else docs


# The CP version of each mixer's `attend`, by mixer type (a subclass before its base: FoX's is an Attention).


def _softmax_attend(mixer: Attention, shard: ContextShard, q, k, v, x, docs=None):
    # config validation refuses model.dropout > 0 under cp for softmax layers; this catches a model built around it
    if mixer.training and mixer.dropout_p > 0:
        raise NotImplementedError(f"ring attention has no attention-probability dropout (dropout_p={mixer.dropout_p});"
                                  f" set model.dropout=0 or parallel.cp=1")
    return ring_attention(q, k, v, shard=shard, docs=_mask_for_ops(docs))  # (B, T_loc, H, D)


def _forgetting_attend(mixer: ForgettingAttention, shard: ContextShard, q, k, v, x, docs=None):
    return ring_attention(q, k, v, shard=shard, docs=_mask_for_ops(docs), log_f=mixer.log_forget(x))


def _gla_attend(mixer: GatedLinearAttention, shard: ContextShard, q, k, v, g, docs=None):
    return gla_context(q, k, v, g, shard=shard, docs=_mask_for_ops(docs), impl=mixer.impl)  # (B, T_loc, H, Dv)


def _rwkv7_attend(mixer: RWKV7TimeMix, shard: ContextShard, r, w, k, v, a, b, docs=None):
    return rwkv7_context(r, w, k, v, a, b, shard=shard, docs=_mask_for_ops(docs), impl=mixer.impl)


CONTEXT_ATTEND = ((ForgettingAttention, _forgetting_attend), (Attention, _softmax_attend),
                  (GatedLinearAttention, _gla_attend), (RWKV7TimeMix, _rwkv7_attend))


def apply_cp(part: nn.Module, shard: ContextShard, *, documents: bool) -> None:
    """Make `part` (a `LanguageModel` or a pipeline stage of one, after tensor parallelism) run on `shard`'s part of
    every sequence, in place. `documents`: whether the run masks packed documents (data.document_mask)."""
    part.document_mask = partial(ContextDocumentMask.from_position_ids, shard=shard, documents=documents)
    for key, block in part.layers.items():
        mixer = block.mixer
        attend = next((fn for cls, fn in CONTEXT_ATTEND if isinstance(mixer, cls)), None)
        if attend is None:
            raise NotImplementedError(f"layer {key}'s mixer {type(mixer).__name__} has no context-parallel form; "
                                      f"set parallel.cp=1")
        mixer.attend = partial(attend, mixer, shard)
    if part.lm_head is not None:  # the stage that computes the loss
        part.forward = partial(_forward_with_global_loss, part.forward, shard)


def _forward_with_global_loss(forward, shard: ContextShard, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                              **kwargs) -> torch.Tensor:
    out = forward(tokens, labels, **kwargs)
    return out if labels is None else global_mean_loss(out, labels, shard)


def global_mean_loss(local_mean: torch.Tensor, labels: torch.Tensor, shard: ContextShard) -> torch.Tensor:
    """The mean loss over every cp rank's labels from this rank's mean over its own (local_mean, labels (B, T_loc)).

    Value: Σ_ranks local sums / Σ_ranks counts, the same on every cp rank. Gradient: cp / (global count) times the
    gradient of this rank's local sum, so that data parallelism's average over dp × cp ranks gives Σ over cp of the
    ranks' shares: the one-process gradient of the mean."""
    count = (labels != IGNORE_INDEX).sum().to(local_mean.dtype)
    # a rank whose labels are all ignored has a 0/0 = nan mean and contributes nothing
    local_sum = torch.where(count > 0, local_mean, 0.0) * count
    totals = torch.stack([local_sum.detach(), count])  # (2,)
    dist.all_reduce(totals, group=shard.group)  # one small collective, never read on the host
    global_sum, global_count = totals.unbind()
    return global_sum / global_count + (local_sum - local_sum.detach()) * (shard.size / global_count)
