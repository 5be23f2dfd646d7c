"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

The schedule is a pure function of the step, so resuming needs no scheduler state beyond the step itself. A param
group may carry an `lr_scale` that the training step multiplies the schedule's learning rate by (1 where absent:
a group's keys are part of its checkpointed state, so groups without a scale keep older checkpoints loadable).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pretrain.config import OptimConfig, layer_mixers

# RWKV-7's decay bias w₀ is the bias of the decay LoRA's up-projection (pretrain/models/rwkv7.py).
RWKV7_DECAY_BIAS = "w_lora.up.bias"
RWKV7_DECAY_BIAS_LR_SCALE = 2.0


def param_groups(model: nn.Module, weight_decay: float, *, rwkv7_reference: bool = False) -> list[dict]:
    """Decay weight matrices; never norms, biases or embeddings (a tied LM head counts as an embedding).

    `rwkv7_reference`: BlinkDL's recipe (RWKV-LM `RWKV-v7/train_temp`, `configure_optimizers`) for the parameters
    of RWKV-7 layers: w₀ gets 2× the learning rate and no decay; every other matrix is decayed except the LoRAs'
    (the reference's w1, w2, a1, …, which it keeps outside its ".weight" rule); vectors are never decayed. In a pure
    RWKV-7 model the embedding and the LM head follow the recipe too (decayed, as in BlinkDL's model). In a hybrid,
    only the parameters under `layers.{i}.` of RWKV-7 layers do: the embedding, final norm and LM head are shared by
    every mixer and follow the shared rule (no decay on the embedding; an untied head is a decayed matrix), since
    BlinkDL's recipe was tuned for a model whose every layer is RWKV-7, and the other mixers' references do not
    decay embeddings. Parameters are told apart by name, which FSDP and tensor parallelism keep (their DTensors keep
    the full ndim), and layer indices survive pipeline splitting (`LanguageModel.layers` is keyed by index).
    """
    mixers = layer_mixers(model.cfg) if rwkv7_reference else []
    rwkv7_layers = {f"layers.{i}." for i, mixer in enumerate(mixers) if mixer == "rwkv7"}
    whole_model_rwkv7 = bool(mixers) and len(rwkv7_layers) == len(mixers)
    embedding_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embedding_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, decay_bias = [], [], []
    for name, p in model.named_parameters():  # shared (tied) parameters are yielded once
        if not p.requires_grad:
            continue
        in_rwkv7_layer = any(name.startswith(prefix) for prefix in rwkv7_layers)
        if in_rwkv7_layer and name.endswith(RWKV7_DECAY_BIAS):
            decay_bias.append(p)
        elif in_rwkv7_layer or (whole_model_rwkv7 and not name.startswith("layers.")):
            (decay if p.ndim >= 2 and "_lora." not in name else no_decay).append(p)
        else:
            (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if rwkv7_layers:
        groups.append({"params": decay_bias, "weight_decay": 0.0, "lr_scale": RWKV7_DECAY_BIAS_LR_SCALE})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `model`, a `LanguageModel` or a pipeline stage of one (its `cfg` names the architecture, and for
    a hybrid each layer's mixer): BlinkDL's groups for RWKV-7 layers when optim.rwkv7_reference_groups is on."""
    groups = param_groups(model, cfg.weight_decay, rwkv7_reference=cfg.rwkv7_reference_groups)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=device.type == "cuda",  # one kernel for all parameters on GPU; the CPU path is the reference
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warm-up, then cosine / WSD / constant."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step <= cfg.warmup_steps:
        return peak * step / max(cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = min((step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1), 1.0)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # WSD (warmup-stable-decay): hold the peak, then decay linearly over the last decay_fraction of the run.
    decay_steps = max(round(total_steps * cfg.decay_fraction), 1)
    decay_start = total_steps - decay_steps
    if step <= decay_start:
        return peak
    return peak + (floor - peak) * min((step - decay_start) / decay_steps, 1.0)
