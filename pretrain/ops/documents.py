"""Document masking: where packed documents start inside each row, in the forms the ops need.

Training packs documents into fixed-length rows. With document masking nothing may cross a document's first
token: attention stays inside the document, recurrent states restart from zero and token shifts see zeros. The
ops take a `DocumentMask` (built once per forward from the loader's in-document position ids) and derive what
each backend wants from it; the derived forms are cached on the object, so every layer of one forward shares
them (on GPU, `cu_seqlens` costs one host read per forward, not one per layer).
"""

from __future__ import annotations

import copy
from functools import cached_property

import torch
import torch.nn.functional as F


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
        self._by_key = {}  # derived forms that take an argument: ("flex", past length), ("bias", dtype)

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

    def previous_steps(self, x: torch.Tensor) -> torch.Tensor:
        """x_{t−1} for each step t of x (B, T, ...) laid out like this mask's rows, zero at t = 0; document starts are
        not applied here (token shifts multiply by `continues`). A mask over part of a longer sequence (context
        parallelism's) overrides it to fetch the step before its first one from where that step lives."""
        return F.pad(x, (0, 0) * (x.ndim - 2) + (1, -1))  # (B, T, ...): x one step later in time

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

    @cached_property
    def first_piece(self) -> torch.Tensor:
        """(B,) int64: index among the N pieces of `cu_seqlens` of each row's first piece (no host read)."""
        return self.last_piece - self.starts[:, 1:].sum(1)

    @cached_property
    def last_piece(self) -> torch.Tensor:
        """(B,) int64: index among the N pieces of `cu_seqlens` of each row's last piece (no host read)."""
        return (self.starts[:, 1:].sum(1) + 1).cumsum(0) - 1  # a row has 1 + (starts after t = 0) pieces

    def to_pieces(self, state: torch.Tensor) -> torch.Tensor:
        """Per-row initial states (B, ...) → per-piece ones (N, ...) for a varlen kernel: a row's first piece gets
        its row's state unless the row starts with a document; every other piece starts from zero."""
        B = self.starts.shape[0]
        if state.shape[0] != B:
            raise ValueError(f"to_pieces wants one state per row ({B}); got {list(state.shape)}")
        keep = ~self.starts[:, 0].view(B, *(1,) * (state.ndim - 1))  # (B, 1, ...)
        pieces = state.new_zeros(self.cu_seqlens.numel() - 1, *state.shape[1:])  # (N, ...)
        return pieces.index_copy(0, self.first_piece, torch.where(keep, state, 0))

    def to_rows(self, piece_states: torch.Tensor) -> torch.Tensor:
        """Per-piece final states (N, ...) → per-row ones (B, ...): each row's last piece."""
        return piece_states[self.last_piece]

    @cached_property
    def attention_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool, True where query t may attend to key s: s ≤ t in the same document (SDPA's
        `attn_mask`, broadcast over heads). T² bytes per row, shared by every layer of a forward."""
        T = self.starts.shape[1]
        steps = torch.arange(T, device=self.starts.device)
        causal = steps[None, :] <= steps[:, None]  # (T, T)  [query, key]
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]  # (B, T, T)
        return (causal & same).unsqueeze(1)  # (B, 1, T, T)

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, T, T) additive mask in dtype: 0 where `attention_mask` is True, −inf elsewhere. SDPA turns a
        boolean mask into exactly this on every call and saves it for backward; made here once per dtype, one
        copy serves every layer."""
        key = ("bias", dtype)
        if key not in self._by_key:
            hidden = ~self.attention_mask
            self._by_key[key] = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(
                hidden, float("-inf"))
        return self._by_key[key]

    def flex_block_mask(self, past_len: int = 0):
        """FlexAttention `BlockMask` of document-causal attention: T queries at key steps past_len … past_len+T−1
        over past_len + T keys, the past keys counted in each row's first piece. Built once per mask and past
        length; compiled on CUDA, where the eager builder would evaluate the whole T × (past_len+T) grid."""
        key = ("flex", past_len)
        if key not in self._by_key:
            from torch.nn.attention.flex_attention import create_block_mask

            B, T = self.starts.shape
            q_doc = self.doc_ids  # (B, T)
            k_doc = F.pad(q_doc, (past_len, 0))  # (B, past_len + T)

            def document_causal(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx + past_len) & (q_doc[b, q_idx] == k_doc[b, kv_idx])

            self._by_key[key] = create_block_mask(document_causal, B, None, T, past_len + T,
                                                  device=self.starts.device, _compile=self.starts.is_cuda)
        return self._by_key[key]

    def with_continues(self, continues: torch.Tensor) -> DocumentMask:
        """A copy whose `continues` is the given tensor: the same values in another layout (a replicated DTensor under
        tensor parallelism, where token shifts multiply their DTensor input by it); every other form is shared."""
        other = copy.copy(self)
        other.__dict__["continues"] = continues  # the cached property's slot
        return other

    def slice(self, start: int, stop: int) -> DocumentMask:
        """The mask of steps start … stop − 1 (a piece of the sequence, e.g. a mini-sequence chunk)."""
        positions = None if self.position_ids is None else self.position_ids[:, start:stop]
        return DocumentMask(self.starts[:, start:stop], positions)

    def piece(self, x: torch.Tensor, start: int, stop: int) -> DocumentMask:
        """The mask of x[:, start:stop], a piece cut from x (B, T, ...) laid out like this mask's rows (mini-sequence
        chunks): `slice`; a mask whose previous steps live elsewhere (context parallelism's) fetches them from x."""
        return self.slice(start, stop)

    def rows(self, start: int, stop: int) -> DocumentMask:
        """The mask of rows start … stop − 1 (a micro-batch)."""
        positions = None if self.position_ids is None else self.position_ids[start:stop]
        return DocumentMask(self.starts[start:stop], positions)


def check_docs(docs: DocumentMask, x: torch.Tensor, op: str) -> None:
    """Reject a mask that does not describe x's (B, T, ...) batch, with what to do about it."""
    if not isinstance(docs, DocumentMask):
        raise TypeError(f"{op}: docs must be a pretrain.ops.DocumentMask (e.g. DocumentMask.from_position_ids); "
                        f"got {type(docs).__name__}")
    if tuple(docs.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{op}: docs covers (B, T) = {list(docs.shape)} but the inputs have {list(x.shape[:2])}; "
                         f"cut the mask with DocumentMask.slice / .rows as the batch was cut")
    if docs.starts.device != x.device:
        raise ValueError(f"{op}: docs is on {docs.starts.device} but the inputs are on {x.device}; build the mask "
                         f"from position ids on the inputs' device")


__all__ = ["DocumentMask", "check_docs"]
