"""Transformer baseline: Llama-style (RMSNorm, SwiGLU, RoPE, SDPA), the `gpt` preset, and the Pro block.

The Pro additions follow the FoX paper (Lin et al. 2025) and its reference code: data-dependent KV-shift
k̃_t = α_t k_{t−1} + (1 − α_t) k_t with α = σ(W_s x) per head (separately for keys and values), per-head
QK-norm, per-head RMSNorm on the output and a sigmoid output gate σ(W_g x).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from pretrain.config import ModelConfig
from pretrain.models.common import LanguageModel, LayerCache, apply_rope, rope_angles, shift_tokens
from pretrain.ops import causal_attention
from pretrain.ops.documents import DocumentMask


# The Pro block's QK-norm eps: fixed, as in the FoX reference, whatever model.norm_eps says.
QK_NORM_EPS = 1e-5


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's channels (the last dim of x (B, T, H, D)) with a scale per head and channel (weight
    of size H·D) or one per channel shared by the heads (size D).

    The head count comes from the weight's size, so a weight sharded with its heads under tensor
    parallelism normalises the local heads.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H, D)
        x = F.rms_norm(x, x.shape[-1:], eps=self.eps)
        return x * self.weight.view(-1, x.shape[-1])  # (H, D) broadcast over B, T

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def kv_shift(x: torch.Tensor, alpha: torch.Tensor, docs: DocumentMask | None = None, *,
             previous: torch.Tensor | None = None) -> torch.Tensor:
    """x̃_t = α_t x_{t−1} + (1 − α_t) x_t with x_{−1} = 0 (and 0 before each document start); x (B, T, H, D),
    alpha (B, T, H). `previous` (B, 1, H, D): x_{−1} where given (an inference cache's last step)."""
    prev = shift_tokens(x, docs, previous=previous)  # (B, T, H, D)
    alpha = alpha.unsqueeze(-1)  # (B, T, H, 1)
    return alpha * prev + (1 - alpha) * x


class Attention(nn.Module):
    """Multi-head causal softmax attention with optional RoPE and Pro additions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.head_dim = d // cfg.n_heads
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        self.k_proj = nn.Linear(d, d, bias=cfg.bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.bias)
        self.o_proj = nn.Linear(d, d, bias=cfg.bias)
        self.rope_theta = cfg.rope_theta if cfg.pos == "rope" else None
        self.dropout_p = cfg.dropout
        self.impl = "sdpa" if cfg.attn_impl == "auto" else cfg.attn_impl
        self.pro = cfg.pro
        if cfg.pro:
            self.k_shift_proj = nn.Linear(d, cfg.n_heads, bias=False)
            self.v_shift_proj = nn.Linear(d, cfg.n_heads, bias=False)
            self.q_norm = HeadRMSNorm(d, QK_NORM_EPS)
            self.k_norm = HeadRMSNorm(d, QK_NORM_EPS)
            self.o_norm = HeadRMSNorm(d, cfg.norm_eps)
            self.g_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, carry: torch.Tensor | None = None, *, docs: DocumentMask | None = None,
                cache: LayerCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, H, D), H = local heads
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.pro:
            k_before = v_before = None
            if cache is not None:  # the shift reaches back one step: keep the last unshifted key and value
                k_before, v_before = cache.tensors.get("shift_k"), cache.tensors.get("shift_v")
                cache.tensors["shift_k"], cache.tensors["shift_v"] = k[:, -1:].clone(), v[:, -1:].clone()
            k = kv_shift(k, torch.sigmoid(self.k_shift_proj(x)), docs, previous=k_before)
            v = kv_shift(v, torch.sigmoid(self.v_shift_proj(x)), docs, previous=v_before)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            if cache is not None:
                positions = torch.arange(cache.steps, cache.steps + T, device=x.device)  # (T,)
            else:
                positions = T if docs is None or docs.position_ids is None else docs.position_ids
            cos, sin = rope_angles(positions, self.head_dim, self.rope_theta, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self.attend(q, k, v, x, docs) if cache is None else self.attend_cached(q, k, v, x, cache)  # (B, T, H, D)
        if self.pro:
            o = self.o_norm(o) * torch.sigmoid(self.g_proj(x)).view_as(o)
        return self.o_proj(o.flatten(2)), carry

    def attend(self, q, k, v, x, docs=None):
        dropout_p = self.dropout_p if self.training else 0.0
        return causal_attention(q, k, v, dropout_p=dropout_p, impl=self.impl, docs=docs)

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                      cache: LayerCache) -> torch.Tensor:
        """Inference: the T new queries attend to the cached keys and values and the new ones (appended to the
        cache). Query t sits at step cache.steps + t, so the causal mask aligns bottom-right; one new token sees
        every key and needs no mask. No dropout (inference)."""
        k, v = cache.append("k", k), cache.append("v", v)  # (B, S, H, D), S = cache.steps + T
        mask = None if q.shape[1] == 1 else causal_lower_right(q.shape[1], k.shape[1])
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask)  # (B, H, T, D)
        return o.transpose(1, 2)  # (B, T, H, D)


def build_transformer(cfg: ModelConfig) -> LanguageModel:
    return LanguageModel(cfg, lambda layer: Attention(cfg))
