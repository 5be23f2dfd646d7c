"""Forgetting Transformer (FoX, Lin et al. 2025): softmax attention with a scalar forget gate per head.

    f_t = σ(w_fᵀ x_t + b_f)  per head,   c_t = Σ_{s≤t} log f_s
    o_i = Σ_{j≤i} softmax_j(q_i k_jᵀ / √D + c_i − c_j) v_j

Everything else is the Transformer's attention (`transformer.Attention`), including the Pro block (KV-shift,
QK-norm, output norm, sigmoid output gate) when `model.pro` is set. FoX has no RoPE: the forget gate carries
position, so `model.pos='rope'` is rejected (the reference's default `use_rope=False`). The forgetting-attention
ops have no probability dropout, so `model.dropout` acts on the embeddings and residual branches only.
The forget-gate bias starts at zero (σ(0) = ½ before the data-dependent term), as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError, ModelConfig
from pretrain.models.common import LanguageModel, LayerCache
from pretrain.models.transformer import Attention
from pretrain.ops.forgetting import forgetting_attention

# model.attn_impl → forgetting_attention's impl; 'unfused' (the materialised-scores path) is the torch one.
IMPLS = {"auto": "auto", "fla": "fla", "flex": "flex", "torch": "torch", "unfused": "torch"}


class ForgettingAttention(Attention):
    def __init__(self, cfg: ModelConfig):
        if cfg.pos == "rope":
            raise ConfigError("FoX takes position from its forget gate and has no RoPE; set model.pos='none'.")
        if cfg.attn_impl not in IMPLS:
            raise ConfigError(f"model.attn_impl='{cfg.attn_impl}' cannot add FoX's forget gate; "
                              f"use one of {', '.join(IMPLS)}.")
        super().__init__(cfg)
        self.impl = IMPLS[cfg.attn_impl]
        self.fgate_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=True)

    def attend(self, q, k, v, x, docs=None):
        return forgetting_attention(q, k, v, self.log_forget(x), impl=self.impl, docs=docs)  # (B, T, H, D)

    def attend_cached(self, q, k, v, x, cache: LayerCache):
        """Inference: the T new queries attend to the cached keys and values and the new ones, with logits
        q_i·k_j/√D + c_i − c_j where c is the running sum of log f, kept in the cache for every step.

        The first call (the prompt) runs the op, whose kernels never hold a T × T matrix. Later calls build the
        bias c_i − c_j, (B, H, T, steps + T): for one new token a pass over the cached keys, as in softmax
        attention, where the op's `past` would recompute c over the whole sequence and its square-causal GPU
        kernel would run every past query again. The bias is formed in fp32 (or wider) and enters attention in the
        queries' dtype."""
        log_f = self.log_forget(x)  # (B, T, H)
        c_new = log_f.cumsum(dim=1)  # (B, T, H): c of the new steps (the op's own cumulative sum at the start)
        if cache.steps == 0:
            for name, new in (("k", k), ("v", v), ("c", c_new)):
                cache.append(name, new)
            return forgetting_attention(q, k, v, log_f, impl=self.impl)  # (B, T, H, D)
        c_new = c_new + cache.tensors["c"][:, -1:]  # continuing the cached steps
        k, v, c = cache.append("k", k), cache.append("v", v), cache.append("c", c_new)  # (B, S, ·), S = steps + T
        T, S = q.shape[1], k.shape[1]
        bias = c_new.transpose(1, 2)[..., :, None] - c.transpose(1, 2)[..., None, :]  # (B, H, T, S): c_i − c_j
        if T > 1:  # query t sits at step S − T + t: keys after it are masked (bottom-right causal)
            future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu_(S - T + 1)  # (T, S)
            bias = bias.masked_fill(future, float("-inf"))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=bias.to(q.dtype))  # (B, H, T, D)
        return o.transpose(1, 2)  # (B, T, H, D)

    def log_forget(self, x: torch.Tensor) -> torch.Tensor:
        """log σ(forget gate) (B, T, H) of the mixer's input x (B, T, d), in fp32 (or wider): the op sums it over
        the whole sequence."""
        logit = self.fgate_proj(x)  # (B, T, H)
        return F.logsigmoid(logit.to(torch.promote_types(logit.dtype, torch.float32)))  # (B, T, H)


def build_fox(cfg: ModelConfig) -> LanguageModel:
    return LanguageModel(cfg, lambda layer: ForgettingAttention(cfg))
