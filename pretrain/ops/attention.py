"""Causal softmax attention on [B, T, H, D] tensors: PyTorch SDPA, or an unfused reference path.

Document masking (`docs`): queries see only keys of their own document. impl="sdpa" then runs, on CUDA without
dropout, FlexAttention with the document block mask (compiled, built once per `DocumentMask`): SDPA with an
arbitrary boolean mask cannot use its FlashAttention backend and computes every T × T score, while the block
mask skips the blocks between documents, so the cost follows Σ document length² instead of T². FlexAttention
has no dropout, so with dropout (and on CPU, where flex would run unfused) SDPA takes the mask as `attn_mask`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.ops.documents import DocumentMask, check_docs
from pretrain.ops.forgetting import _compiled_flex


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                     dropout_p: float = 0.0, impl: str = "sdpa", docs: DocumentMask | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + causal mask) v, with dropout on the probabilities when dropout_p > 0.

    impl="sdpa" uses `F.scaled_dot_product_attention` (FlashAttention / memory-efficient backends on GPU);
    impl="unfused" materialises scores, softmax and the dropout mask exactly as the GPT of Korthikanti et
    al. does, so its saved activations can be checked against that paper's formulas.
    docs: document starts (B, T); query t attends only to keys s ≤ t of its own document.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"causal_attention wants q, k, v as [B, T, H, D] (q and k alike, v matching in B, T, H); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if impl not in ("sdpa", "unfused"):
        raise ValueError(f"causal_attention impl must be 'sdpa' or 'unfused', got {impl!r}")
    if docs is not None:
        check_docs(docs, q, "causal_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    if impl == "sdpa" and docs is None:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    elif impl == "sdpa" and q.is_cuda and dropout_p == 0.0:
        o = _compiled_flex()(q, k, v, block_mask=docs.flex_block_mask(), scale=scale)  # (B, H, T, D)
    elif impl == "sdpa":
        # the additive form SDPA would make of the boolean mask in every layer, made once per DocumentMask
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=docs.attention_bias(q.dtype), dropout_p=dropout_p,
                                           scale=scale)
    else:
        T = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
        if docs is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
            probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        else:
            # where() keeps the mask cached on docs for backward: one (B, 1, T, T) copy for all layers
            probs = torch.where(docs.attention_mask, scores, float("-inf")).softmax(dim=-1)
        o = F.dropout(probs, dropout_p) @ v  # (B, H, T, D)
    return o.transpose(1, 2)  # (B, T, H, D)
