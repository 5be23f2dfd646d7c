"""Document masking: where packed documents start inside each row, in the forms the ops need.

Training packs documents into fixed-length rows. With document masking nothing may cross a document's first
token: attention stays inside the document, recurrent states restart from zero and token shifts see zeros. The
ops take a `DocumentMask` (built once per forward from the loader's in-document position ids) and derive what
each backend wants from it; the derived forms are cached on the object, so every layer of one forward shares
them (on GPU, `cu_seqlens` costs one host read per forward, not one per layer).
"""

from __future__ import annotations

from functools import cached_property

import torch


class DocumentMask:
    """`starts` (B, T) bool: True at each document's first token. A True at step t cuts everything before t in
    its row, an op's initial state or past included; the first step of a row without a True continues whatever
    state the op was given (none, in training)."""

    def __init__(self, starts: torch.Tensor, position_ids: torch.Tensor | None = None):
        if starts.dtype != torch.bool or starts.ndim != 2:
            raise ValueError(f"DocumentMask wants a (B, T) bool tensor of document starts; got {starts.dtype} "
                             f"{list(starts.shape)}")
        self.starts = starts  # (B, T)
        self.position_ids = position_ids  # (B, T) in-document positions where known (rotary/learned positions)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> DocumentMask:
        """From in-document positions (B, T) that count from 0 at each document's first token."""
        if position_ids.ndim != 2 or position_ids.dtype.is_floating_point:
            raise ValueError(f"position_ids must be (B, T) integers; got {position_ids.dtype} "
                             f"{list(position_ids.shape)}")
        return cls(position_ids == 0, position_ids)

    @property
    def shape(self) -> torch.Size:
        return self.starts.shape

    @cached_property
    def doc_ids(self) -> torch.Tensor:
        """(B, T) int64: the document index of each step within its row (0 = the piece before the row's first
        start; steps with equal ids may see each other, causally)."""
        return self.starts.cumsum(1)

    @cached_property
    def continues(self) -> torch.Tensor:
        """(B, T) bool: whether step t's previous step (t − 1, in the same row) is in the same document; False at
        t = 0. Token shifts multiply the previous token by it."""
        keep = ~self.starts
        return torch.cat([torch.zeros_like(keep[:, :1]), keep[:, 1:]], dim=1)

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 (N + 1,): boundaries of the N pieces of the flattened (1, B·T) batch, for varlen kernels (fla,
        flash-attention). A piece starts at every row start and at every document start."""
        B, T = self.starts.shape
        cut = self.starts.clone()
        cut[:, 0] = True
        idx = torch.nonzero(cut.reshape(-1)).squeeze(1)  # (N,): a host sync, once per mask
        end = torch.tensor([B * T], device=idx.device, dtype=idx.dtype)
        return torch.cat([idx, end]).to(torch.int32)

    @cached_property
    def max_seqlen(self) -> int:
        """Length of the longest piece of `cu_seqlens` (a host read)."""
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    def slice(self, start: int, stop: int) -> DocumentMask:
        """The mask of steps start … stop − 1 (a piece of the sequence, e.g. a mini-sequence chunk)."""
        positions = None if self.position_ids is None else self.position_ids[:, start:stop]
        return DocumentMask(self.starts[:, start:stop], positions)

    def rows(self, start: int, stop: int) -> DocumentMask:
        """The mask of rows start … stop − 1 (a micro-batch)."""
        positions = None if self.position_ids is None else self.position_ids[start:stop]
        return DocumentMask(self.starts[start:stop], positions)


__all__ = ["DocumentMask"]
