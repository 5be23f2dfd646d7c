"""Causal softmax attention on [B, T, H, D] tensors: PyTorch SDPA, or an unfused reference path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                     dropout_p: float = 0.0, impl: str = "sdpa") -> torch.Tensor:
    """softmax(q kᵀ · scale + causal mask) v, with dropout on the probabilities when dropout_p > 0.

    impl="sdpa" uses `F.scaled_dot_product_attention` (FlashAttention / memory-efficient backends on GPU);
    impl="unfused" materialises scores, softmax and the dropout mask exactly as the GPT of Korthikanti et
    al. does, so its saved activations can be checked against that paper's formulas.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"causal_attention wants q, k, v as [B, T, H, D] (q and k alike, v matching in B, T, H); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    if impl == "sdpa":
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    elif impl == "unfused":
        T = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
        probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        o = F.dropout(probs, dropout_p) @ v  # (B, H, T, D)
    else:
        raise ValueError(f"causal_attention impl must be 'sdpa' or 'unfused', got {impl!r}")
    return o.transpose(1, 2)  # (B, T, H, D)
