"""Sequence-mixer math as pure functions on [B, T, H, D] tensors (no modules, no process groups)."""

from pretrain.ops.attention import causal_attention
from pretrain.ops.documents import DocumentMask
from pretrain.ops.forgetting import forgetting_attention
from pretrain.ops.gla import gla
from pretrain.ops.rwkv7 import rwkv7

__all__ = ["DocumentMask", "causal_attention", "forgetting_attention", "gla", "rwkv7"]
