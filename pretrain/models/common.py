"""Pieces every architecture shares: norms, MLPs, RoPE, `Block(mixer, mlp)` and the `LanguageModel` shell.

A sequence mixer is any module with `forward(x, carry=None, *, docs=None) -> (y, carry)`. `carry` is a tensor a
mixer may hand to the blocks after it (RWKV-7's first-layer value); mixers that need nothing pass it through.
`docs` is the batch's `DocumentMask` under document masking (None otherwise): nothing may cross a document start.
Feed-forwards take it too (RWKV-7's channel mix shifts tokens). For inference, mixers and feed-forwards also take
`cache=` (a `LayerCache`, passed only when the model is given an `InferenceCache`): they continue the sequence held
there and store what the next call needs. Mixers derive their local head count from tensor
shapes, never from the config, so column-sharded projections under tensor parallelism just work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.ops.documents import DocumentMask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def mlp_hidden_size(cfg: ModelConfig) -> int:
    """Feed-forward width: d_model × mlp_ratio rounded up to a multiple of mlp_multiple_of."""
    m = cfg.mlp_multiple_of
    return m * math.ceil(round(cfg.d_model * cfg.mlp_ratio, 6) / m)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) ⊙ up(x)) — the Llama feed-forward."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor, docs: DocumentMask | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        # docs, cache: unused, every token is transformed on its own
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """down(gelu(up(x))) — the GPT feed-forward."""

    def __init__(self, d_model: int, hidden: int, bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor, docs: DocumentMask | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        # docs, cache: unused, every token is transformed on its own
        return self.down_proj(F.gelu(self.up_proj(x)))


def build_mlp(cfg: ModelConfig) -> nn.Module:
    cls = SwiGLU if cfg.mlp == "swiglu" else GeluMLP
    return cls(cfg.d_model, mlp_hidden_size(cfg), bias=cfg.bias)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 or wider (bf16/fp16 → fp32; fp32 and fp64 stay): the dtype of losses, gates and rotations."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rope_angles(positions: int | torch.Tensor, head_dim: int, theta: float,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, computed in fp32: each (T, head_dim / 2) for positions 0 … T − 1 given as
    the int T, or (B, T, head_dim / 2) for a (B, T) tensor of positions (document masking's in-document ones)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # ([B,] T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, T, H, D) by the per-position angles ([B,] T, D/2)."""
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)  # (B, T, H, D/2) each
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # ([B,] T, 1, D/2): broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def shift_tokens(x: torch.Tensor, docs: DocumentMask | None = None, *,
                 previous: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t−1} for each step t of x (B, T, ...), zero at t = 0 and, under document masking, at each document start.
    `previous` (B, 1, ...), where given, is the step before t = 0 (an inference cache's last one) instead of zero."""
    if docs is not None and previous is None:
        prev = docs.previous_steps(x)  # (B, T, ...): under context parallelism the step before t = 0 is elsewhere
    elif previous is None:
        prev = F.pad(x, (0, 0) * (x.ndim - 2) + (1, -1))  # (B, T, ...): x one step later in time
    else:
        prev = torch.cat([previous, x[:, :-1]], dim=1)  # (B, T, ...)
    if docs is None:
        return prev
    keep = docs.continues.view(*docs.shape, *(1,) * (x.ndim - 2))  # (B, T, 1, ...)
    return prev * keep.to(prev.dtype)


@dataclass(eq=False)
class LayerCache:
    """One layer's inference state: what its mixer and feed-forward keep between calls, by name, in `tensors` (keys
    and values, a recurrent state, a token shift's last input; each with the batch first), and `steps`, the number of
    steps the sequence had before the current call (positions continue from it). With a `capacity` (most steps the
    sequence will have), what grows along time is written into buffers of that length allocated once."""

    steps: int = 0
    capacity: int | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def append(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """`tensors[name]` followed by `new` (B, T, ...) along time, stored back and returned (just `new` at first).
        Without a capacity that is a concatenation, a copy of everything so far per call; with one, `new` is
        written into place and the result is a view of the first steps + T steps of the buffer."""
        if self.capacity is None:
            past = self.tensors.get(name)
            self.tensors[name] = new if past is None else torch.cat([past, new], dim=1)
            return self.tensors[name]
        end = self.steps + new.shape[1]
        if end > self.capacity:
            raise ValueError(f"the inference cache holds {self.capacity} steps (its capacity); {end} do not fit")
        if name not in self.buffers:
            self.buffers[name] = new.new_empty(new.shape[0], self.capacity, *new.shape[2:])  # (B, capacity, ...)
        self.buffers[name][:, self.steps:end] = new
        self.tensors[name] = self.buffers[name][:, :end]  # (B, steps + T, ...)
        return self.tensors[name]


class InferenceCache:
    """What `model(tokens, cache=cache)` needs to continue the sequences it has seen so far: one `LayerCache` per
    layer and `steps`, the number of steps seen. Start empty; each call appends its T steps to every row.
    `capacity`: the most steps the sequences will reach, if known; keys and values are then kept in buffers of that
    length, allocated at the first call, instead of being concatenated (copied whole) at every call."""

    def __init__(self, capacity: int | None = None):
        self.steps = 0
        self.capacity = capacity
        self.layers: dict[str, LayerCache] = {}

    def layer(self, name: str) -> LayerCache:
        """Layer `name`'s cache, told how many steps came before the current call."""
        entry = self.layers.setdefault(name, LayerCache(capacity=self.capacity))
        entry.steps = self.steps
        return entry


class Block(nn.Module):
    """Pre-norm residual block: x + drop(mixer(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, mixer: nn.Module, mlp: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.mixer = mixer
        self.mlp_norm = make_norm(cfg)
        self.mlp = mlp
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, carry: torch.Tensor | None = None, *, docs: DocumentMask | None = None,
                cache: LayerCache | None = None):
        # the cache goes only where given, so training calls (and any wrapper of mixer or mlp) stay as they were
        state = {} if cache is None else {"cache": cache}
        y, carry = self.mixer(self.attn_norm(x), carry, docs=docs, **state)
        x = x + self.dropout(y)  # (B, T, d)
        x = x + self.dropout(self.mlp(self.mlp_norm(x), docs=docs, **state))
        return x, carry


# The label of positions the loss skips (padding, document starts): the model's loss defines it, and parallel/'s
# vocab-parallel and chunked losses, which must skip the same positions, import it from here.
IGNORE_INDEX = -100

# Output projections of residual branches get std / sqrt(2 · n_layers) (GPT-2), so the residual stream's
# variance does not grow with depth.
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


class LanguageModel(nn.Module):
    """Token embedding → blocks → final norm → LM head; the shell all four architectures share.

    `model(tokens)` returns logits (B, T, V); `model(tokens, labels=labels)` returns the mean
    cross-entropy over labels != -100 through `self.loss`, which mini-sequence chunking can replace
    without ever materialising the full logits. `position_ids` (B, T), counting from 0 at each document's first
    token, turn on document masking: no information crosses a position with id 0, and positional encodings use
    the ids. Submodules may be None (pipeline stages drop the embedding or the head), in which case `tokens` is
    already a hidden state or the hidden state is returned. `cache` (an `InferenceCache`, for generation) makes the
    call continue the sequences the cache holds: `tokens` are the next steps of every row, positions continue from
    `cache.steps`, and the cache is updated in place (keys and values, recurrent states, token shifts).
    """

    def __init__(self, cfg: ModelConfig, make_mixer: Callable[[int], nn.Module] | None = None, *,
                 make_block: Callable[[int], nn.Module] | None = None):
        """Layer i is `make_block(i)` if given (architectures with their own block), else
        `Block(make_mixer(i), <model.mlp feed-forward>, cfg)`."""
        super().__init__()
        if make_block is None:
            def make_block(i: int) -> nn.Module:
                return Block(make_mixer(i), build_mlp(cfg), cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        # A dict keyed by layer index keeps parameter names stable when pipeline stages delete layers.
        self.layers = nn.ModuleDict({str(i): make_block(i) for i in range(cfg.n_layers)})
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, cache: InferenceCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V), the mean loss when `labels` are given, or the hidden state (B, T, d) from a pipeline
        stage without the head. `last_only`: the final norm and LM head run on the last position alone, giving
        (B, 1, V): a prefill needs only the next token's prediction, not T · V logits."""
        if cache is not None and position_ids is not None:
            raise ValueError("an inference cache continues whole rows; it takes no position_ids (document masking)")
        if last_only and labels is not None:
            raise ValueError("last_only gives the last position's logits; a loss over labels needs every position")
        # built once per forward: the layers share its derived forms (masks, varlen boundaries)
        docs = self.document_mask(position_ids)
        if self.tok_emb is None:  # a later pipeline stage: the input is already the hidden state
            h = tokens
        else:
            h = self.tok_emb(tokens)  # (B, T, d)
            if self.pos_emb is not None:
                offset = 0 if cache is None else cache.steps
                h = h + self.pos_emb(self.learned_positions(h.shape[1], position_ids, h.device, offset=offset))
            h = self.emb_dropout(h)
        carry = None
        for name, block in self.layers.items():
            if cache is None:
                h, carry = block(h, carry, docs=docs)
            else:
                h, carry = block(h, carry, docs=docs, cache=cache.layer(name))
        if cache is not None:
            cache.steps += h.shape[1]
        if self.lm_head is None:
            return h
        if last_only:
            h = h[:, -1:]  # (B, 1, d)
        h = self.norm(h)
        if labels is None:
            return self.lm_head(h)  # (B, T, V)
        return self.loss(h, labels)

    def document_mask(self, position_ids: torch.Tensor | None) -> DocumentMask | None:
        """The `DocumentMask` forward builds from `position_ids` (None without them); parallel layouts that split the
        sequence replace it with a mask that knows where the rest of the sequence lives."""
        return None if position_ids is None else DocumentMask.from_position_ids(position_ids)

    def learned_positions(self, T: int, position_ids: torch.Tensor | None, device, *,
                          offset: int = 0) -> torch.Tensor:
        """Rows of the learned position table for T steps: offset … offset + T − 1 (offset: the steps an inference
        cache has seen), or the in-document ids. A document longer than the table (model.seq_len) has ids past its
        end, since a window's first token continues its document's count; those steps share the table's last row."""
        if position_ids is None:
            if offset + T > self.cfg.seq_len:
                raise ValueError(f"sequence of {offset + T} tokens exceeds the learned position table "
                                 f"(model.seq_len={self.cfg.seq_len})")
            return torch.arange(offset, offset + T, device=device)  # (T,)
        return position_ids.clamp(max=self.cfg.seq_len - 1)  # (B, T)

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the LM head's logits over labels != -100, computed in fp32 (fp64 for fp64 logits)."""
        logits = at_least_fp32(self.lm_head(h))  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter (also after building on the meta device and `to_empty`): `init_steps`, in order."""
        init_by_steps(self, generator)

    def init_steps(self, generator: torch.Generator | None = None) -> Iterator[tuple[str, InitStep]]:
        """The initialisation as ordered steps (submodule name, init): `init(module)`, run under `torch.no_grad()`,
        writes that submodule's own parameters (not its children's), all of them, drawing from `generator` (None: the
        default one).

        Normal(0, init_std) for linears and embeddings, std / sqrt(2 · n_layers) on residual output projections,
        each other leaf's own `reset_parameters()` (norms: ones/zeros); then the steps of any submodule with its own
        `init_steps()` (architecture-specific schemes such as RWKV-7's) run last so they win. Since a step needs
        only its submodule's own parameters, parallel/ runs the steps in this order on full-size copies of just
        those and keeps each process's shards: the weights of a one-process `init_weights`, with at most one
        parameter of the model whole at a time.
        """
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS else 1.0
                yield name, partial(_init_linear, std=std * scale, generator=generator)
            elif isinstance(module, nn.Embedding):
                yield name, partial(_init_embedding, std=std, generator=generator)
            elif hasattr(module, "reset_parameters") and any(True for _ in module.parameters(recurse=False)):
                yield name, _reset_parameters  # norms of every kind: ones and zeros
        for name, module in self.named_modules():
            if module is not self and hasattr(module, "init_steps"):
                for sub, init in module.init_steps(generator):
                    yield ".".join(filter(None, (name, sub))), init


InitStep = Callable[[nn.Module], None]


@torch.no_grad()
def init_by_steps(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Run `module.init_steps(generator)` in order on `module` itself."""
    for name, init in module.init_steps(generator):
        init(module.get_submodule(name))


def _init_linear(module: nn.Linear, *, std: float, generator: torch.Generator | None) -> None:
    nn.init.normal_(module.weight, std=std, generator=generator)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _init_embedding(module: nn.Embedding, *, std: float, generator: torch.Generator | None) -> None:
    nn.init.normal_(module.weight, std=std, generator=generator)


def _reset_parameters(module: nn.Module) -> None:
    module.reset_parameters()


def zero_weight(module: nn.Module) -> None:
    nn.init.zeros_(module.weight)


@torch.no_grad()
def orthogonal_weight(module: nn.Module, *, gain: float, generator: torch.Generator | None) -> None:
    """`nn.init.orthogonal_(module.weight, gain)`, bit for bit, with the Gaussian drawn into the weight itself rather
    than into a copy: one full-size temporary (QR's) instead of two, which bounds start-up memory (parallel/ holds
    one full parameter at a time while initialising)."""
    weight = module.weight  # (rows, cols)
    tall = weight.shape[0] >= weight.shape[1]
    weight.normal_(0, 1, generator=generator)
    q, r = torch.linalg.qr(weight if tall else weight.t())  # q: the tall side's shape
    q *= r.diagonal().sign()  # unique Q: R's diagonal made positive
    weight.copy_(q if tall else q.t())
    weight.mul_(gain)
