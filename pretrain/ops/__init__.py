"""Sequence-mixer math as pure functions on [B, T, H, D] tensors (no modules, no torch.distributed)."""

from pretrain.ops.attention import causal_attention

__all__ = ["causal_attention"]
