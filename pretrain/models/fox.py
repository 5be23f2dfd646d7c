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
        """Inference: the T new queries attend to the cached keys, values and log forget gates and the new ones
        (the op's `past`; the extended triple goes back into the cache)."""
        names = ("k", "v", "log_f")
        past = tuple(cache.tensors[n] for n in names) if "k" in cache.tensors else None
        o, extended = forgetting_attention(q, k, v, self.log_forget(x), past=past, output_past=True, impl=self.impl)
        cache.tensors.update(zip(names, extended))
        return o  # (B, T, H, D)

    def log_forget(self, x: torch.Tensor) -> torch.Tensor:
        """log σ(forget gate) (B, T, H) of the mixer's input x (B, T, d), in fp32 (or wider): the op sums it over
        the whole sequence."""
        logit = self.fgate_proj(x)  # (B, T, H)
        return F.logsigmoid(logit.to(torch.promote_types(logit.dtype, torch.float32)))  # (B, T, H)


def build_fox(cfg: ModelConfig) -> LanguageModel:
    return LanguageModel(cfg, lambda layer: ForgettingAttention(cfg))
