"""Model registry: `build_model(ModelConfig)` returns a plain single-device `nn.Module`."""

from __future__ import annotations

import importlib

import torch.nn as nn

from pretrain.config import ModelConfig

# arch → "module:function"; imported lazily so one architecture's optional kernels never burden another.
REGISTRY = {
    "transformer": "pretrain.models.transformer:build_transformer",
    "fox": "pretrain.models.fox:build_fox",
    "gla": "pretrain.models.gla:build_gla",
    "rwkv7": "pretrain.models.rwkv7:build_rwkv7",
    "hybrid": "pretrain.models.hybrid:build_hybrid",  # any pattern of the above mixers (model.mixers)
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build and initialise the architecture `cfg.arch` (for 'hybrid', the mixers of `cfg.mixers`; ConfigError on a
    pattern or option it cannot build).

    Under `torch.device("meta")` nothing is allocated. The training loop materialises such a model with
    `pretrain.train.build_parallel_model` (each process only its shards); a plain `model.to_empty(device=...)` unties
    tied embeddings (re-tie `lm_head.weight = tok_emb.weight` before `model.init_weights()`).
    """
    if cfg.arch not in REGISTRY:
        raise ValueError(f"model.arch='{cfg.arch}' has no implementation; available: {', '.join(REGISTRY)}")
    module, fn = REGISTRY[cfg.arch].split(":")
    model = getattr(importlib.import_module(module), fn)(cfg)
    model.init_weights()
    return model
