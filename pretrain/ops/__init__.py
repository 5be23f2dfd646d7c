"""Sequence-mixer math as pure functions on [B, T, H, D] tensors (no modules, no process groups)."""

from pretrain.ops.attention import causal_attention
from pretrain.ops.documents import DocumentMask
from pretrain.ops.forgetting import forgetting_attention
from pretrain.ops.gla import gla, gla_step
from pretrain.ops.rwkv7 import rwkv7, rwkv7_kappa_step, rwkv7_step

__all__ = ["DocumentMask", "causal_attention", "forgetting_attention", "gla", "gla_step", "rwkv7", "rwkv7_kappa_step",
           "rwkv7_step"]
