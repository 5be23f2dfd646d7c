"""Tensor-parallel plans: module-name patterns (`*` = one name component) → parallel styles, per architecture.

Heads are split over the TP ranks: projections producing per-head channels are column-parallel, output
projections row-parallel, per-head parameters `HeadSharded`; low-rank down-projections and RWKV-7's μ act on
the replicated input and are `ReplicatedParams`. The MLP is column → row. See `tensor.py` for the layouts.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel)

from parallel.tensor import (AllReduceInputGradient, HeadSharded, ReplicatedDocumentMask, ReplicatedParams,
                             VocabParallelEmbedding)
from pretrain.config import ModelConfig, layer_config, layer_mixers

Plan = dict[str, tuple[ParallelStyle, ...]]

# Mixers whose blocks hand a tensor on to later blocks (RWKV-7's first-layer values): from the first such layer on,
# it crosses pipeline stages next to the hidden state (parallel.pipeline.stage_carries).
CARRY_ARCHS = ("rwkv7",)


def _attention(cfg: ModelConfig) -> Plan:
    """Transformer and FoX (pretrain/models/transformer.py, fox.py)."""
    plan = {name: (ColwiseParallel(),) for name in ("q_proj", "k_proj", "v_proj")}
    if cfg.pro:
        plan.update({name: (ColwiseParallel(),) for name in ("k_shift_proj", "v_shift_proj", "g_proj")})
        plan.update({name: (HeadSharded("weight"),) for name in ("q_norm", "k_norm", "o_norm")})
    if cfg.arch == "fox":
        plan["fgate_proj"] = (ColwiseParallel(),)  # one forget gate per head
    return plan


def _gla(cfg: ModelConfig) -> Plan:
    plan = {name: (ColwiseParallel(),) for name in ("q_proj", "k_proj", "v_proj", "g_proj", "gk_proj.up")}
    plan["gk_proj.down"] = (ReplicatedParams(),)
    plan["o_norm"] = (ReplicatedParams(local_views=True),)  # one scale per channel, shared by all heads
    return plan


def _rwkv7(cfg: ModelConfig) -> Plan:
    # The mixer's own vectors: μ mixes the (replicated) token-shifted input; k_k, k_a, r_k act on its heads.
    plan = {"": (ReplicatedParams(*(f"mu_{n}" for n in "rwkvag")), HeadSharded("k_k", "k_a", "r_k"),
                 ReplicatedDocumentMask())}
    plan.update({name: (ColwiseParallel(),) for name in ("r_proj", "k_proj", "v_proj")})
    for lora in ("w_lora", "a_lora", "v_lora", "g_lora"):  # up-projection biases are w₀, a₀, v₀: per head
        plan[f"{lora}.down"] = (ReplicatedParams(),)
        plan[f"{lora}.up"] = (ColwiseParallel(),)
    plan["o_norm"] = (HeadSharded("weight", "bias"),)
    return plan


MIXERS = {"transformer": _attention, "fox": _attention, "gla": _gla, "rwkv7": _rwkv7}


def tp_plan(cfg: ModelConfig, *, sequence_parallel: bool) -> Plan:
    """The plan for `cfg.arch` (a hybrid: each layer's mixer's); patterns that name no module (a pipeline stage's
    missing parts, the first RWKV-7 layer's value-residual LoRA) are skipped."""
    # The residual stream's layout, and the style of the norms that run on it.
    residual = Shard(1) if sequence_parallel else Replicate()
    norm = SequenceParallel() if sequence_parallel else ReplicatedParams()

    def whole_sequence(n_inputs: int) -> ParallelStyle:
        """What a mixer or an MLP gets: the whole sequence (an all-gather under SP, whose backward is one
        reduce-scatter); without SP the residual already is whole, and its gradient is all-reduced in backward."""
        if not sequence_parallel:
            return AllReduceInputGradient()
        others = (None,) * (n_inputs - 1)  # the mixer's carry passes as it is
        return PrepareModuleInput(input_layouts=(residual, *others), desired_input_layouts=(Replicate(), *others))

    back_to_residual = RowwiseParallel(output_layouts=residual, use_local_output=False)
    plan: Plan = {
        "tok_emb": (VocabParallelEmbedding(output_layout=residual),),
        "pos_emb": (ReplicatedParams(), PrepareModuleInput(input_layouts=(Replicate(),),
                                                           desired_input_layouts=(Replicate(),))),
        # a block's input from a previous pipeline stage arrives as a plain local tensor
        "layers.*": (PrepareModuleInput(input_layouts=(residual, None), desired_input_layouts=(residual, None)),),
        "layers.*.emb_norm": (norm,),
        "layers.*.attn_norm": (norm,),
        "layers.*.mlp_norm": (norm,),
        "layers.*.mixer": (whole_sequence(2),),  # before any mixing: RWKV-7's token shift sees across shards
        "layers.*.mixer.o_proj": (back_to_residual,),
        "layers.*.mlp": (whole_sequence(1),),
        "layers.*.mlp.gate_proj": (ColwiseParallel(),),
        "layers.*.mlp.up_proj": (ColwiseParallel(),),
        "layers.*.mlp.down_proj": (back_to_residual,),
        "norm": (norm,),
        # logits stay split over the vocabulary: tensor.vocab_parallel_loss never gathers them
        "lm_head": (ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False),
                    *(() if sequence_parallel else (whole_sequence(1),))),
    }
    # A pure model: one pattern for every layer (`*`). A hybrid: each layer's own mixer plan under its index, built
    # from its pure-model view (`layer_config`), so layer i is laid out as in a pure model of its mixer.
    mixers = layer_mixers(cfg)
    layers = {"*": 0} if cfg.arch != "hybrid" else {str(i): i for i in range(cfg.n_layers)}
    for key, index in layers.items():
        if mixers[index] == "rwkv7":
            # the channel mix's own token-shift mixing
            mlp = f"layers.{key}.mlp"
            plan[mlp] = plan.get(mlp, ()) + (ReplicatedParams("mu_k"), ReplicatedDocumentMask())
        for name, styles in MIXERS[mixers[index]](layer_config(cfg, index)).items():
            pattern = f"layers.{key}.mixer.{name}".rstrip(".")
            plan[pattern] = plan.get(pattern, ()) + styles
    return plan
