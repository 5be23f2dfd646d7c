"""Gated Linear Attention (Yang et al. 2023), following fla's `GatedLinearAttention` layer.

    q = x W_q, k = x W_k (key dim d/2), v = x W_v (value dim d), split into H heads
    log α = logsigmoid(x W₁ W₂ + b) / 16               per key channel, W₁ of rank 16
    S_t = Diag(α_t) S_{t−1} + k_tᵀ v_t,  o_t = q_t S_t / √D_k
    y = W_o (RMSNorm_head(o) ⊙ SiLU(x W_g))

The per-head output norm has one scale per channel shared by all heads (size d/H, as fla's `g_norm_swish_gate`),
so a trained model exports to fla as it is; under tensor parallelism it is replicated. Projections have no
biases (as in fla), so `model.bias` only reaches the norms of the shared block; `model.pos` must not be 'rope'
(the recurrence carries order itself; 'learned' positions still go through the shared embedding).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError, ModelConfig
from pretrain.models.common import LanguageModel, LayerCache, at_least_fp32
from pretrain.models.transformer import HeadRMSNorm
from pretrain.ops.gla import gla, gla_step

GATE_RANK = 16  # low rank of the decay projection (GLA paper)
GATE_NORMALIZER = 16  # log α = logsigmoid(·) / 16 keeps the decays near 1 (slow forgetting) at initialisation


class LowRank(nn.Module):
    """up(act(down(x))): a rank-r projection; `up` is column-sharded with the heads, `down` stays whole."""

    ACTIVATIONS = {None: lambda t: t, "tanh": torch.tanh, "sigmoid": torch.sigmoid}

    def __init__(self, d_in: int, rank: int, d_out: int, *, activation: str | None = None, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.ACTIVATIONS[self.activation](self.down(x)))


def linear_mixer_impl(cfg: ModelConfig) -> str:
    """model.attn_impl → the linear-recurrence ops' impl (auto | torch | fla)."""
    if cfg.attn_impl not in ("auto", "torch", "fla"):
        raise ConfigError(f"model.attn_impl='{cfg.attn_impl}' is softmax-attention only; {cfg.arch} uses "
                          f"auto | torch | fla.")
    return cfg.attn_impl


def reject_rope(cfg: ModelConfig) -> None:
    if cfg.pos == "rope":
        raise ConfigError(f"model.arch='{cfg.arch}' has no rotary embeddings; set model.pos='none'.")


class GatedLinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        reject_rope(cfg)
        d, H = cfg.d_model, cfg.n_heads
        key_dim = d // 2
        if key_dim % H:
            raise ConfigError(f"GLA's key dim d_model/2 = {key_dim} must be divisible by model.n_heads={H}.")
        self.head_k_dim, self.head_v_dim = key_dim // H, d // H
        self.impl = linear_mixer_impl(cfg)
        self.q_proj = nn.Linear(d, key_dim, bias=False)
        self.k_proj = nn.Linear(d, key_dim, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.gk_proj = LowRank(d, GATE_RANK, key_dim, bias=True)
        self.g_proj = nn.Linear(d, d, bias=False)
        self.o_norm = HeadRMSNorm(self.head_v_dim, cfg.norm_eps)  # one scale per channel, shared by the heads
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, carry: torch.Tensor | None = None, *, docs=None,
                cache: LayerCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_k_dim)  # (B, T, H, Dk), H = local heads
        k = self.k_proj(x).view(B, T, -1, self.head_k_dim)  # (B, T, H, Dk)
        v = self.v_proj(x).view(B, T, -1, self.head_v_dim)  # (B, T, H, Dv)
        # the log decay is formed in fp32 (or wider): under bf16 autocast logsigmoid(·)/16 loses small values
        gk = at_least_fp32(self.gk_proj(x)).view(B, T, -1, self.head_k_dim)  # (B, T, H, Dk)
        g = F.logsigmoid(gk) / GATE_NORMALIZER  # (B, T, H, Dk): log decay
        if cache is None:
            o = self.attend(q, k, v, g, docs)  # (B, T, H, Dv)
        elif T == 1:  # decoding one token: the plain recurrent step on the cached state (B, H, Dk, Dv)
            o, cache.tensors["state"] = gla_step(q, k, v, g, initial_state=cache.tensors.get("state"),
                                                impl=self.impl)
        else:  # prefill: the chunked recurrence, continuing from the cached state, constant cost per token
            o, cache.tensors["state"] = gla(q, k, v, g, impl=self.impl, initial_state=cache.tensors.get("state"),
                                            output_final_state=True)
        o = self.o_norm(o) * F.silu(self.g_proj(x)).view_as(o)  # (B, T, H, Dv)
        return self.o_proj(o.flatten(2)), carry

    def attend(self, q, k, v, g, docs=None):
        """The chunked recurrence alone, as its own method (named like the softmax mixers' `attend`) so that it
        can be recomputed in backward without the projections around it. Document starts reset its state."""
        return gla(q, k, v, g, impl=self.impl, docs=docs)  # (B, T, H, Dv)


def build_gla(cfg: ModelConfig) -> LanguageModel:
    return LanguageModel(cfg, lambda layer: GatedLinearAttention(cfg))
