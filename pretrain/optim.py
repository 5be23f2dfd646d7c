"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

The schedule is a pure function of the step, so resuming needs no scheduler state beyond the step itself. A param
group may carry an `lr_scale` that the training step multiplies the schedule's learning rate by (1 where absent:
a group's keys are part of its checkpointed state, so groups without a scale keep older checkpoints loadable).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pretrain.config import OptimConfig

# RWKV-7's decay bias w₀ is the bias of the decay LoRA's up-projection (pretrain/models/rwkv7.py).
RWKV7_DECAY_BIAS = "w_lora.up.bias"
RWKV7_DECAY_BIAS_LR_SCALE = 2.0


def param_groups(model: nn.Module, weight_decay: float, *, rwkv7_reference: bool = False) -> list[dict]:
    """Decay weight matrices; never norms, biases or embeddings (a tied LM head counts as an embedding).

    `rwkv7_reference`: BlinkDL's recipe instead (RWKV-LM `RWKV-v7/train_temp`, `configure_optimizers`): w₀ gets
    2× the learning rate and no decay; every other matrix is decayed (the embedding and the LM head too) except the
    LoRAs' (the reference's w1, w2, a1, …, which it keeps outside its ".weight" rule); vectors are never decayed.
    Parameters are told apart by name, which FSDP and tensor parallelism keep (their DTensors keep the full ndim).
    """
    if rwkv7_reference:
        return _rwkv7_param_groups(model, weight_decay)
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters are yielded once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rwkv7_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, decay_bias = [], [], []
    for name, p in model.named_parameters():  # shared (tied) parameters are yielded once
        if not p.requires_grad:
            continue
        if name.endswith(RWKV7_DECAY_BIAS):
            decay_bias.append(p)
        elif p.ndim >= 2 and "_lora." not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"params": decay_bias, "weight_decay": 0.0, "lr_scale": RWKV7_DECAY_BIAS_LR_SCALE}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `model`, a `LanguageModel` or a pipeline stage of one (its `cfg` names the architecture)."""
    rwkv7_reference = model.cfg.arch == "rwkv7" and cfg.rwkv7_reference_groups
    groups = [g for g in param_groups(model, cfg.weight_decay, rwkv7_reference=rwkv7_reference) if g["params"]]
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
