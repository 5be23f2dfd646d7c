"""Export a checkpoint to Hugging Face, fla and RWKV formats, and import such weights as a checkpoint to train on.

    python -m pretrain.export RUN_OR_CHECKPOINT_DIR --to hf|fla|rwkv --out DIR [--dtype fp32|bf16]
    python -m pretrain.export --from hf|fla DIR --config FILE --out RUN_DIR

Export reads the model weights alone (never the optimizer state) from a checkpoint of any layout into a plain
model on the CPU (DCP reshards; no process group), renames them and writes what the target loads as it is:
- `--to hf`: `model.safetensors` + `config.json` for `transformers.AutoModelForCausalLM`: the Transformer as
  `LlamaForCausalLM`, the `gpt` preset as `GPT2LMHeadModel` (activation_function "gelu", exact);
- `--to fla`: the same files for fla's `GLAForCausalLM`, `ForgettingTransformerForCausalLM` and `RWKV7ForCausalLM`
  (after `import fla`); a GLA + transformer hybrid as `GLAForCausalLM` whose `attn` option puts fla's softmax
  `Attention` at our transformer layers (fla's Attention needs flash-attn to run);
- `--to rwkv`: `model.pth` for BlinkDL's `rwkv` package (RWKV-7 "x070": `RWKV(model=DIR/model, ...)` with
  RWKV_V7_ON=1);
plus the run's `tokenizer.json` (with a `tokenizer_config.json`) when it trained with one. A config that the
target cannot compute faithfully (another norm, MLP or position encoding, biases the reference lacks, the Pro
block outside our own code, RWKV-7's GroupNorm eps against fla's at head sizes other than 64) is refused with an
`ExportError` naming the option. A hybrid of one mixer is the pure model; hybrids of several mixers export only as
above: fla has no hybrid with FoX layers, its RWKV-7 + attention hybrids are not ours (`RWKV7_HYBRID_REASONS`), and
the HF and rwkv formats have one mixer.

Import reads `config.json` + safetensors of a Llama, GPT-2 or fla GLA / FoX / RWKV-7 model, checks them against
the model of `--config FILE`, and writes them as a weights-only checkpoint (`checkpoint.save_weights`) in RUN_DIR:
`python -m pretrain.train --config FILE --train.run_dir=RUN_DIR` then starts from those weights at step 0 with a
fresh optimizer. HF → ours → HF gives back the same tensors bit for bit.

The name maps, one per format, are `RULES` below: each `Rule` names a tensor of theirs, the tensors of ours it is
made of, and the two conversions (transposes for GPT-2's Conv1D and RWKV's LoRA matrices, GPT-2's fused q/k/v,
RWKV's (1, 1, C) vectors).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from pretrain.config import ConfigError, ModelConfig, layer_config, layer_mixers, load_config
from pretrain.models.common import mlp_hidden_size

TARGETS = ("hf", "fla", "rwkv")
SOURCES = ("hf", "fla")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The LayerNorm eps of BlinkDL's RWKV-7 (torch's default; the rwkv package hard-codes it) and its GroupNorm eps.
RWKV_LAYER_NORM_EPS = 1e-5
RWKV_GROUP_NORM_EPS = 64e-5


class ExportError(Exception):
    """The model cannot be written to (or read from) the format faithfully, or the files do not fit; the message
    names the option or file and what to do."""


# --------------------------------------------------------------------------- name maps

def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _one(t: torch.Tensor) -> tuple[torch.Tensor]:
    return (t,)


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _transposed_back(t: torch.Tensor) -> tuple[torch.Tensor]:
    return (t.t().contiguous(),)


@dataclass(frozen=True)
class Rule:
    """Their tensor `theirs` = to_theirs(*our tensors `ours`); our tensors = to_ours(their tensor)."""

    theirs: str
    ours: tuple[str, ...]
    to_theirs: Callable[..., torch.Tensor] = _same
    to_ours: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = _one


def renamed(theirs: str, ours: str) -> Rule:
    return Rule(theirs, (ours,))


def transposed(theirs: str, ours: str) -> Rule:
    """A matrix stored the other way round (GPT-2's Conv1D, RWKV's LoRA matrices x @ W)."""
    return Rule(theirs, (ours,), _transposed, _transposed_back)


def reshaped(theirs: str, ours: str, shape: tuple[int, ...]) -> Rule:
    """A vector of ours (C,) that they keep as `shape` ((1, 1, C) in RWKV, (H, D) for r_k)."""
    return Rule(theirs, (ours,), lambda t: t.reshape(shape), lambda t: (t.reshape(-1),))


def fused_qkv(theirs: str, ours: tuple[str, str, str], *, conv1d: bool) -> Rule:
    """GPT-2's c_attn: q, k, v stacked along the output dimension (a Conv1D weight stores (in, 3·out))."""
    def to_theirs(q, k, v):
        t = torch.cat([q, k, v], dim=0)  # (3·d, d) or (3·d,)
        return t.t().contiguous() if conv1d else t

    def to_ours(t):
        t = t.t() if conv1d else t
        return tuple(part.contiguous() for part in t.chunk(3, dim=0))

    return Rule(theirs, ours, to_theirs, to_ours)


def _llama_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [renamed("model.embed_tokens.weight", "tok_emb.weight"), renamed("model.norm.weight", "norm.weight")]
    for i in range(cfg.n_layers):
        theirs, ours = f"model.layers.{i}.", f"layers.{i}."
        rules += [renamed(theirs + "input_layernorm.weight", ours + "attn_norm.weight"),
                  renamed(theirs + "post_attention_layernorm.weight", ours + "mlp_norm.weight")]
        rules += [renamed(f"{theirs}self_attn.{p}.weight", f"{ours}mixer.{p}.weight")
                  for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        rules += [renamed(f"{theirs}mlp.{p}.weight", f"{ours}mlp.{p}.weight")
                  for p in ("gate_proj", "up_proj", "down_proj")]
    return rules + _head(cfg, "lm_head.weight")


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [renamed("transformer.wte.weight", "tok_emb.weight"), renamed("transformer.wpe.weight", "pos_emb.weight")]
    rules += [renamed(f"transformer.ln_f.{p}", f"norm.{p}") for p in ("weight", "bias")]
    for i in range(cfg.n_layers):
        theirs, ours = f"transformer.h.{i}.", f"layers.{i}."
        rules += [renamed(f"{theirs}ln_1.{p}", f"{ours}attn_norm.{p}") for p in ("weight", "bias")]
        rules += [renamed(f"{theirs}ln_2.{p}", f"{ours}mlp_norm.{p}") for p in ("weight", "bias")]
        rules += [fused_qkv(f"{theirs}attn.c_attn.{p}", tuple(f"{ours}mixer.{n}_proj.{p}" for n in "qkv"),
                            conv1d=p == "weight") for p in ("weight", "bias")]
        for their_layer, our_layer in (("attn.c_proj", "mixer.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                                       ("mlp.c_proj", "mlp.down_proj")):
            rules += [transposed(f"{theirs}{their_layer}.weight", f"{ours}{our_layer}.weight"),
                      renamed(f"{theirs}{their_layer}.bias", f"{ours}{our_layer}.bias")]
    return rules + _head(cfg, "lm_head.weight")


def _fla_block_rules(i: int, mixer: list[tuple[str, str]]) -> list[Rule]:
    """fla's pre-norm blocks: attn_norm / attn / mlp_norm / mlp, the MLP being the SwiGLU (GatedMLP)."""
    theirs, ours = f"model.layers.{i}.", f"layers.{i}."
    rules = [renamed(theirs + "attn_norm.weight", ours + "attn_norm.weight"),
             renamed(theirs + "mlp_norm.weight", ours + "mlp_norm.weight")]
    rules += [renamed(f"{theirs}attn.{a}", f"{ours}mixer.{b}") for a, b in mixer]
    return rules + [renamed(f"{theirs}mlp.{p}.weight", f"{ours}mlp.{p}.weight")
                    for p in ("gate_proj", "up_proj", "down_proj")]


def _fla_shell(cfg: ModelConfig) -> list[Rule]:
    return [renamed("model.embeddings.weight", "tok_emb.weight"), renamed("model.norm.weight", "norm.weight"),
            *_head(cfg, "lm_head.weight")]


def _fla_gla_rules(cfg: ModelConfig) -> list[Rule]:
    """fla's GLA model; a hybrid's transformer layers are its softmax Attention layers (the 'attn' option)."""
    mixer = [(f"{p}.weight", f"{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")]
    mixer += [("gk_proj.0.weight", "gk_proj.down.weight"), ("gk_proj.1.weight", "gk_proj.up.weight"),
              ("gk_proj.1.bias", "gk_proj.up.bias"), ("g_norm_swish_gate.weight", "o_norm.weight")]
    attention = [(f"{p}.weight", f"{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return _fla_shell(cfg) + [r for i, name in enumerate(layer_mixers(cfg))
                              for r in _fla_block_rules(i, attention if name == "transformer" else mixer)]


def _fla_fox_rules(cfg: ModelConfig) -> list[Rule]:
    mixer = [(f"{p}.weight", f"{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mixer += [("f_proj.weight", "fgate_proj.weight"), ("f_proj.bias", "fgate_proj.bias")]
    return _fla_shell(cfg) + [r for i in range(cfg.n_layers) for r in _fla_block_rules(i, mixer)]


def _norm_rules(theirs: str, ours: str, cfg: ModelConfig) -> list[Rule]:
    return [renamed(f"{theirs}.{p}", f"{ours}.{p}") for p in (("weight", "bias") if cfg.bias else ("weight",))]


def _fla_rwkv7_rules(cfg: ModelConfig) -> list[Rule]:
    d, H = cfg.d_model, cfg.n_heads
    rules = [renamed("model.embeddings.weight", "tok_emb.weight"), *_norm_rules("model.norm", "norm", cfg),
             *_head(cfg, "lm_head.weight"), *_norm_rules("model.layers.0.pre_norm", "layers.0.emb_norm", cfg)]
    for i in range(cfg.n_layers):
        theirs, ours = f"model.layers.{i}.", f"layers.{i}."
        rules += _norm_rules(theirs + "attn_norm", ours + "attn_norm", cfg)
        rules += _norm_rules(theirs + "ffn_norm", ours + "mlp_norm", cfg)
        att, mix = theirs + "attn.", ours + "mixer."
        rules += [reshaped(f"{att}x_{n}", f"{mix}mu_{n}", (1, 1, d)) for n in "rwkvag"]
        rules += [renamed(att + n, mix + n) for n in ("k_k", "k_a")]
        rules += [reshaped(att + "r_k", mix + "r_k", (H, d // H))]
        rules += [renamed(f"{att}{p}.weight", f"{mix}{p}.weight") for p in ("r_proj", "k_proj", "v_proj", "o_proj")]
        for lora in ("w_lora", "a_lora", "g_lora") + (("v_lora",) if i > 0 else ()):
            rules += [renamed(f"{att}{lora}.lora.0.weight", f"{mix}{lora}.down.weight"),
                      renamed(f"{att}{lora}.lora.2.weight", f"{mix}{lora}.up.weight")]
            if lora != "g_lora":
                rules += [renamed(f"{att}{lora}.lora.2.bias", f"{mix}{lora}.up.bias")]
        rules += [renamed(f"{att}g_norm.{p}", f"{mix}o_norm.{p}") for p in ("weight", "bias")]
        rules += [renamed(f"{theirs}ffn.x_k", f"{ours}mlp.mu_k"),
                  renamed(f"{theirs}ffn.key.weight", f"{ours}mlp.up_proj.weight"),
                  renamed(f"{theirs}ffn.value.weight", f"{ours}mlp.down_proj.weight")]
    return rules


def _rwkv_rules(cfg: ModelConfig) -> list[Rule]:
    """BlinkDL's x070 names (RWKV-LM `RWKV-v7/train_temp/src/model.py`); LoRA matrices are applied as x @ W."""
    d, H = cfg.d_model, cfg.n_heads
    vector = (1, 1, d)
    rules = [renamed("emb.weight", "tok_emb.weight"), renamed("head.weight", "lm_head.weight"),
             *_norm_rules("ln_out", "norm", cfg), *_norm_rules("blocks.0.ln0", "layers.0.emb_norm", cfg)]
    for i in range(cfg.n_layers):
        theirs, ours = f"blocks.{i}.", f"layers.{i}."
        rules += _norm_rules(theirs + "ln1", ours + "attn_norm", cfg)
        rules += _norm_rules(theirs + "ln2", ours + "mlp_norm", cfg)
        att, mix = theirs + "att.", ours + "mixer."
        rules += [reshaped(f"{att}x_{n}", f"{mix}mu_{n}", vector) for n in "rwkvag"]
        rules += [reshaped(att + "k_k", mix + "k_k", vector), reshaped(att + "k_a", mix + "k_a", vector),
                  reshaped(att + "r_k", mix + "r_k", (H, d // H))]
        for theirs_name, ours_name in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"),
                                       ("output", "o_proj")):
            rules.append(renamed(f"{att}{theirs_name}.weight", f"{mix}{ours_name}.weight"))
        for letter in "wagv" if i > 0 else "wag":
            lora = f"{mix}{letter}_lora."
            rules += [transposed(f"{att}{letter}1", lora + "down.weight"),
                      transposed(f"{att}{letter}2", lora + "up.weight")]
            if letter != "g":
                rules.append(reshaped(f"{att}{letter}0", lora + "up.bias", vector))
        rules += [renamed(f"{att}ln_x.{p}", f"{mix}o_norm.{p}") for p in ("weight", "bias")]
        rules += [reshaped(f"{theirs}ffn.x_k", f"{ours}mlp.mu_k", vector),
                  renamed(f"{theirs}ffn.key.weight", f"{ours}mlp.up_proj.weight"),
                  renamed(f"{theirs}ffn.value.weight", f"{ours}mlp.down_proj.weight")]
    return rules


def _head(cfg: ModelConfig, theirs: str) -> list[Rule]:
    """The LM head, unless tied to the embedding (the target ties it by `tie_word_embeddings`)."""
    return [] if cfg.tie_embeddings else [renamed(theirs, "lm_head.weight")]


RULES: dict[str, Callable[[ModelConfig], list[Rule]]] = {
    "llama": _llama_rules, "gpt2": _gpt2_rules, "fla-gla": _fla_gla_rules, "fla-fox": _fla_fox_rules,
    "fla-rwkv7": _fla_rwkv7_rules, "rwkv": _rwkv_rules,
}


# --------------------------------------------------------------------------- which format, and is it faithful

def _require(cfg: ModelConfig, fmt: str, field: str, allowed, why: str = "") -> None:
    value = getattr(cfg, field)
    if value not in allowed:
        wanted = " or ".join(repr(a) for a in allowed)
        raise ExportError(f"{fmt} has no counterpart of model.{field}={value!r} (it needs {wanted}{why}); this model "
                          "cannot be exported to it faithfully.")


def pure_config(cfg: ModelConfig) -> ModelConfig:
    """The pure model's config for a hybrid pattern of one mixer ('gla*4' is the pure GLA bitwise: the same
    parameter names and computation); `cfg` itself for a pure model or a hybrid of several mixers."""
    if cfg.arch != "hybrid" or len(set(layer_mixers(cfg))) > 1:
        return cfg
    return layer_config(cfg, 0)


# Why fla's RWKV-7 hybrids are not ours (fla-core 0.6.0, fla/models/rwkv7/modeling_rwkv7.py).
RWKV7_HYBRID_REASONS = (
    "fla's RWKV7Block unpacks four outputs (the last v_first) from its mixer while fla's Attention returns three, "
    "so an RWKV7Config with 'attn' fails in its forward ('not enough values to unpack'); "
    "its attention layers keep RWKV-7's channel mix (squared ReLU, token shift) where ours keep model.mlp; "
    "its value residual starts from zeros and only its layer 0 makes v_first, and its layer 0 always has the "
    "embedding LayerNorm (pre_norm), so attention at layer 0 differs twice from ours (values from the first RWKV-7 "
    "layer, no embedding norm before an attention layer)")


def _hybrid_format(cfg: ModelConfig, target: str) -> str:
    """The format of a hybrid of several mixers: fla's GLA config with softmax-attention layers (its 'attn' option)
    for gla + transformer; ExportError with the reason for every other pattern and target."""
    present, pattern = set(layer_mixers(cfg)), f"model.mixers={cfg.mixers!r}"
    if target == "hf":
        raise ExportError(f"{pattern}: Hugging Face's Llama and GPT-2 have softmax attention in every layer and no "
                          "other mixer; export GLA + transformer hybrids with --to fla.")
    if target == "rwkv":
        raise ExportError(f"{pattern}: BlinkDL's rwkv package runs RWKV-7 blocks only, with no other mixer.")
    if "fox" in present:
        raise ExportError(f"{pattern}: fla has no hybrid with FoX layers: its hybrids are a GLA or RWKV-7 config "
                          "whose 'attn' option puts its standard softmax Attention (rotary, no forget gate) in the "
                          "listed layers, and its FoX model (ForgettingTransformerConfig) takes no other mixer.")
    if {"gla", "rwkv7"} <= present:
        raise ExportError(f"{pattern}: fla has no config with both GLA and RWKV-7 layers (a GLA or RWKV-7 model "
                          "takes only softmax attention as other layers).")
    if "rwkv7" in present:
        raise ExportError(f"{pattern}: RWKV-7 + softmax attention hybrids do not export to fla faithfully: "
                          f"{RWKV7_HYBRID_REASONS}.")
    attention = "fla's softmax Attention (fla/layers/attn.py) in a GLA model"
    _require(cfg, attention, "pos", ("rope",), ": it rotates q and k in every attention layer (GPT-NeoX halves), "
             "and GLA layers take no positions")
    _require(cfg, attention, "pro", (False,), ": it has no KV-shift, output gate or output norm, and fla's configs "
             "never turn on its qk_norm")
    format_for(layer_config(cfg, layer_mixers(cfg).index("gla")), "fla")  # the GLA layers' (and blocks') options
    return "fla-gla"


def format_for(cfg: ModelConfig, target: str) -> str:
    """The format a `--to` target means for this model ('llama', 'gpt2', 'fla-gla', …), after checking that the
    target computes what our model computes; ExportError naming the option otherwise."""
    cfg = pure_config(cfg)
    if cfg.arch == "hybrid":
        return _hybrid_format(cfg, target)
    if target == "hf":
        _require(cfg, "Hugging Face (Llama / GPT-2)", "arch", ("transformer",),
                 "; export FoX, GLA and RWKV-7 with --to fla")
        _require(cfg, "Hugging Face (Llama / GPT-2)", "pro", (False,), ": the Pro block has no HF model")
        if cfg.pos == "learned":  # the gpt preset
            fmt = "gpt2"
            for field, allowed in (("norm", ("layernorm",)), ("mlp", ("gelu",)), ("bias", (True,))):
                _require(cfg, "GPT-2", field, allowed, " as the gpt preset has")
            return fmt
        for field, allowed in (("norm", ("rmsnorm",)), ("mlp", ("swiglu",)), ("bias", (False,)), ("pos", ("rope",))):
            _require(cfg, "Llama", field, allowed)
        return "llama"
    if target == "fla":
        _require(cfg, "fla", "arch", ("gla", "fox", "rwkv7"), "; export the Transformer with --to hf")
        if cfg.arch == "rwkv7":
            _require(cfg, "fla RWKV-7", "norm", ("layernorm",))
            group_eps = cfg.norm_eps * (cfg.d_model // cfg.n_heads)
            if not math.isclose(group_eps, RWKV_GROUP_NORM_EPS, rel_tol=1e-6):
                raise ExportError(
                    f"fla's RWKV-7 GroupNorm eps is head_dim × norm_eps = {cfg.d_model // cfg.n_heads} × "
                    f"{cfg.norm_eps:g} = {group_eps:g} where ours is {RWKV_GROUP_NORM_EPS:g} (BlinkDL's); they agree "
                    "only at head size 64 with model.norm_eps=1e-5. Export with --to rwkv (any head size) instead.")
            return "fla-rwkv7"
        name = {"gla": "fla GLA", "fox": "fla FoX"}[cfg.arch]
        _require(cfg, name, "pro", (False,), ": fla's FoX layer has no KV-shift or output norm")
        for field, allowed in (("norm", ("rmsnorm",)), ("mlp", ("swiglu",)), ("bias", (False,)), ("pos", ("none",))):
            _require(cfg, name, field, allowed)
        return f"fla-{cfg.arch}"
    if target == "rwkv":
        _require(cfg, "BlinkDL's rwkv", "arch", ("rwkv7",))
        for field, allowed in (("norm", ("layernorm",)), ("bias", (True,)), ("norm_eps", (RWKV_LAYER_NORM_EPS,))):
            _require(cfg, "BlinkDL's rwkv (x070)", field, allowed)
        return "rwkv"
    raise ExportError(f"--to {target!r} is unknown; use one of {', '.join(TARGETS)}")


def their_config(cfg: ModelConfig, fmt: str) -> dict:
    """config.json for the HF / fla formats."""
    d, L, H, V = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size
    hidden = mlp_hidden_size(cfg)  # the MLP's (RWKV-7: the channel mix's) width
    common = {"vocab_size": V, "tie_word_embeddings": cfg.tie_embeddings}
    if fmt == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, "hidden_size": d,
                "intermediate_size": hidden, "num_hidden_layers": L, "num_attention_heads": H,
                "num_key_value_heads": H, "head_dim": d // H, "hidden_act": "silu",
                "max_position_embeddings": cfg.seq_len,
                "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "attention_bias": False, "mlp_bias": False}
    if fmt == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common, "n_embd": d, "n_layer": L,
                "n_head": H, "n_inner": hidden, "n_positions": cfg.seq_len, "activation_function": "gelu",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": cfg.dropout}
    fla = {**common, "hidden_size": d, "num_hidden_layers": L, "intermediate_size": hidden, "norm_eps": cfg.norm_eps,
           "max_position_embeddings": cfg.seq_len}
    if fmt == "fla-gla":
        return {"architectures": ["GLAForCausalLM"], "model_type": "gla", **fla, "num_heads": H, "expand_k": 0.5,
                "expand_v": 1.0, "hidden_act": "swish", "use_short_conv": False, "use_output_gate": True,
                "feature_map": None, "clamp_min": None, "attn": attention_spec(cfg)}
    if fmt == "fla-fox":
        return {"architectures": ["ForgettingTransformerForCausalLM"], "model_type": "forgetting_transformer", **fla,
                "num_heads": H, "num_kv_heads": None, "qkv_bias": False, "qk_norm": False, "use_output_gate": False,
                "window_size": None, "hidden_act": "swish"}
    from pretrain.models.rwkv7 import lora_rank

    return {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", **fla, "head_dim": d // H, "num_heads": H,
            "value_dim": d, "hidden_act": "sqrelu", "norm_first": True, "norm_bias": cfg.bias,
            "decay_low_rank_dim": lora_rank(d, 2.5), "a_low_rank_dim": lora_rank(d, 2.5),
            "v_low_rank_dim": lora_rank(d, 1.7), "gate_low_rank_dim": lora_rank(d, 5.0)}


def attention_spec(cfg: ModelConfig) -> dict | None:
    """fla's 'attn' option for the transformer layers of a hybrid (None without any): their indices and the
    settings of fla's Attention that are ours: every head its own keys (no GQA), no q/k/v bias, no sliding window,
    our rotary base. The same dict fla's config normalises it to, so a config fla saves compares equal."""
    layers = [i for i, name in enumerate(layer_mixers(cfg)) if name == "transformer"]
    if not layers:
        return None
    return {"layers": layers, "num_heads": cfg.n_heads, "num_kv_heads": cfg.n_heads, "qkv_bias": False,
            "window_size": None, "rope_theta": cfg.rope_theta}


def _check_attention_spec(config: dict, cfg: ModelConfig, directory) -> None:
    """ExportError unless the directory's 'attn' option (a dict, a list of them, or none) puts the same softmax
    attention at the same layers as model.mixers does."""
    ours = attention_spec(cfg)
    specs = config.get("attn") or []
    specs = [specs] if isinstance(specs, dict) else specs
    theirs_layers = sorted(i for spec in specs for i in spec.get("layers", []))
    ours_layers = ours["layers"] if ours else []
    where = f"model.mixers={cfg.mixers!r}" if cfg.arch == "hybrid" else f"model.arch={cfg.arch!r}"
    if theirs_layers != ours_layers:
        raise ExportError(f"{directory}: its config.json puts softmax attention ('attn' layers) at layers "
                          f"{theirs_layers}, {where} at {ours_layers}; import it with a config whose transformer "
                          "layers are those.")
    if ours is None:  # no softmax layers on either side (an empty 'attn' entry): no settings to compare
        return
    for spec in specs:
        settings = {**spec, "num_kv_heads": spec.get("num_kv_heads") or spec.get("num_heads")}
        differ = [f"{k}={settings.get(k, fla_default)!r} there, {ours[k]!r} for this config"
                  for k, fla_default in (("num_heads", None), ("num_kv_heads", None), ("qkv_bias", False),
                                         ("window_size", None), ("rope_theta", 10000.0))
                  if settings.get(k, fla_default) != ours[k]]
        if differ:
            raise ExportError(f"{directory}: its softmax attention layers are another model's: 'attn' "
                              + "; ".join(differ))


# --------------------------------------------------------------------------- conversion

def to_theirs(ours: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    return {r.theirs: r.to_theirs(*(ours[n] for n in r.ours)) for r in rules}


def to_ours(theirs: dict[str, torch.Tensor], rules: list[Rule], *, source: str) -> dict[str, torch.Tensor]:
    missing = sorted(r.theirs for r in rules if r.theirs not in theirs)
    unused = sorted(theirs.keys() - {r.theirs for r in rules})
    if missing or unused:
        raise ExportError(f"{source} does not hold the model of this config: missing {missing[:5]}, unexpected "
                          f"{unused[:5]} (check model.n_layers, model.tie_embeddings, model.bias and the arch)")
    ours = {}
    for r in rules:
        ours.update(zip(r.ours, r.to_ours(theirs[r.theirs])))
    return ours


# --------------------------------------------------------------------------- checkpoints

def load_checkpoint_model(path: str | Path) -> tuple[nn.Module, ModelConfig, dict]:
    """(plain fp32 model on the CPU, its ModelConfig, the run config) from a checkpoint of any layout, or a run
    directory's newest: `pretrain.generate.load_model`, the one loader of checkpoints for inference (the stored
    config validated, model.attn_impl 'fla' read as 'auto' off CUDA, checksums verified, only the model's tensors
    read: DCP reshards)."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.generate import load_model

    try:
        model, run_config = load_model(path, device="cpu", dtype=torch.float32)
    except (CheckpointError, ConfigError) as error:
        raise ExportError(str(error)) from error
    return model, model.cfg, run_config


def run_tokenizer(run_config: dict):
    """The tokenizer the run trained with (`pretrain.generate.load_run_tokenizer`: data.tokenizer, its EOS token
    from the data manifest), or None where it cannot be loaded here."""
    from pretrain.generate import load_run_tokenizer

    try:
        return load_run_tokenizer(run_config)
    except (OSError, ValueError):
        return None


def _copy_tokenizer(tokenizer, out: Path, *, seq_len: int) -> None:
    """A tokenizer.json the run used, with a tokenizer_config.json naming its EOS token (for AutoTokenizer)."""
    path = getattr(tokenizer, "path", "")
    if not path.endswith(".json"):
        return
    shutil.copyfile(path, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token, "model_max_length": seq_len},
        indent=2))


def export(source: str | Path, target: str, out: str | Path, *, dtype: str = "fp32") -> Path:
    """Write the checkpoint `source` (or a run directory's newest) in `target`'s format to `out`; returns `out`."""
    model, cfg, run_config = load_checkpoint_model(source)
    fmt = format_for(cfg, target)
    return write(model, pure_config(cfg), fmt, out, dtype=dtype, run_config=run_config)


def write(model: nn.Module, cfg: ModelConfig, fmt: str, out: str | Path, *, dtype: str = "fp32",
          run_config: dict | None = None) -> Path:
    """Write `model` (a plain one) in format `fmt` (from `format_for`) to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ours = {k: v.detach().to(DTYPES[dtype]) for k, v in model.state_dict().items()}
    theirs = to_theirs(ours, RULES[fmt](cfg))
    tokenizer = run_tokenizer(run_config) if run_config is not None else None
    if fmt == "rwkv":
        torch.save(theirs, out / "model.pth")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in theirs.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        config = their_config(cfg, fmt)
        eos = tokenizer.eos_id if tokenizer is not None and tokenizer.eos_id < cfg.vocab_size else None
        # documents end with EOS and no BOS is ever added (data.prepare); the formats' defaults name other ids
        config.update(bos_token_id=None, eos_token_id=eos, pad_token_id=None,
                      torch_dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
        (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        _copy_tokenizer(tokenizer, out, seq_len=cfg.seq_len)
    return out


# --------------------------------------------------------------------------- import

def read_theirs(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) of a Hugging Face / fla model directory (one or several safetensors files)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ExportError(f"{directory} has no config.json: not a Hugging Face / fla model directory")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{directory} has no .safetensors files (convert .bin weights with transformers first)")
    tensors = {}
    for file in files:
        tensors.update(load_file(str(file)))
    config = json.loads((directory / "config.json").read_text())
    # what checkpoints saved by older transformers carry besides weights: causal masks, rotary frequencies
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_BUFFERS)}
    if config.get("model_type") == "gpt2" and not any(k.startswith("transformer.") for k in tensors):
        tensors = {k if k == "lm_head.weight" else f"transformer.{k}": v for k, v in tensors.items()}  # GPT2Model's
    return config, tensors


_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _their_fields(config: dict) -> dict:
    """config.json's fields as `their_config` writes them: GPT-2's n_inner null means 4 · n_embd; Llama's rotary
    base may sit in rope_parameters (transformers 5) or rope_theta, and only unscaled RoPE is ours."""
    fields = dict(config)
    if fields.get("model_type") == "gpt2" and fields.get("n_inner") is None:
        fields["n_inner"] = 4 * fields.get("n_embd", 768)
    if fields.get("model_type") == "llama":
        rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
        fields["rope_theta"] = rope.get("rope_theta", fields.get("rope_theta", 10000.0))
        fields["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return fields


# config.json fields compared with the config we would write for this model (same meaning in every format)
_CHECKED_FIELDS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
                   "num_attention_heads", "num_heads", "n_head", "head_dim", "intermediate_size", "n_inner",
                   "num_key_value_heads", "rms_norm_eps", "norm_eps", "layer_norm_epsilon", "activation_function",
                   "hidden_act", "tie_word_embeddings", "expand_k", "expand_v", "use_short_conv", "qk_norm",
                   "use_output_gate", "qkv_bias", "norm_bias", "value_dim", "attention_bias", "mlp_bias", "rope_theta",
                   "rope_type", "clamp_min", "feature_map", "window_size", "num_kv_heads")


def import_model(source: str, directory: str | Path, cfg: ModelConfig) -> nn.Module:
    """Our plain model of `cfg` holding the weights of the HF / fla model in `directory`."""
    from pretrain.models import build_model

    if source not in SOURCES:
        raise ExportError(f"--from {source!r} is unknown; use one of {', '.join(SOURCES)}")
    fmt = format_for(cfg, source)
    model, cfg = build_model(cfg), pure_config(cfg)  # a hybrid of one mixer reads the pure model's files
    config, theirs = read_theirs(directory)
    config, expected = _their_fields(config), _their_fields(their_config(cfg, fmt))
    # a field left null there (fla's intermediate_size: derived from hidden_ratio) is checked by the tensors' shapes
    differ = [f"{k}={config[k]!r} there, {expected[k]!r} for this config" for k in _CHECKED_FIELDS
              if config.get(k) is not None and k in expected and config[k] != expected[k]
              and not (isinstance(config[k], float) and math.isclose(config[k], expected[k], rel_tol=1e-9))]
    if differ:
        raise ExportError(f"{directory} holds another model than the config's: " + "; ".join(differ))
    if fmt == "fla-gla":
        _check_attention_spec(config, cfg, directory)
    ours = to_ours(theirs, RULES[fmt](cfg), source=str(directory))
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["tok_emb.weight"]
    state = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (ours {tuple(state[k].shape)})" for k, v in ours.items()
             if v.shape != state[k].shape]
    if wrong:
        raise ExportError(f"{directory}: tensors of another shape than the config's model: {wrong[:5]}")
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in ours.items()}, strict=True)
    return model


def import_run(source: str, directory: str | Path, config_file: str | Path, out: str | Path) -> Path:
    """Write the HF / fla model in `directory` as a weights-only checkpoint of the run `config_file` in `out`."""
    from pretrain.checkpoint import save_weights

    cfg = load_config(["--config", str(config_file), f"--train.run_dir={out}"])
    model = import_model(source, directory, cfg.model)
    return save_weights(out, model, run_config=cfg.to_dict())


# --------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.export",
        description="Export a checkpoint to Hugging Face / fla / RWKV formats, or import such weights as a "
                    "checkpoint to train on. Refuses models the target cannot compute faithfully, naming the option.")
    parser.add_argument("source", nargs="?", help="export: a checkpoint directory (step_N) or a run directory (its "
                        "newest checkpoint), written under any parallel layout")
    parser.add_argument("--to", choices=TARGETS, help="export target: hf (Transformer → LlamaForCausalLM, gpt preset "
                        "→ GPT2LMHeadModel), fla (GLA / FoX / RWKV-7 for fla's model classes), rwkv (RWKV-7 as a "
                        ".pth for BlinkDL's rwkv package)")
    parser.add_argument("--from", dest="from_format", metavar=("{hf,fla}", "DIR"), nargs=2,
                        help="import: the format and the directory (config.json + safetensors) to read")
    parser.add_argument("--config", help="import: the run config (TOML) whose model the weights must fit")
    parser.add_argument("--out", required=True, help="export: the directory to write the model files to; import: "
                        "the run directory for the weights-only checkpoint (train with --train.run_dir=OUT)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="export: dtype of the written tensors")
    args = parser.parse_args(argv)
    if args.from_format is None and (args.source is None or args.to is None):
        parser.error("export needs SOURCE and --to; import needs --from FORMAT DIR and --config")
    if args.from_format is not None and (args.config is None or args.source is not None or args.to is not None):
        parser.error("import takes --from FORMAT DIR --config FILE --out RUN_DIR (no SOURCE, no --to)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.from_format is not None:
            source, directory = args.from_format
            path = import_run(source, directory, args.config, args.out)
            print(f"wrote {path}: train with --config {args.config} --train.run_dir={args.out}")
        else:
            print(f"wrote {export(args.source, args.to, args.out, dtype=args.dtype)}")
    except (ExportError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
