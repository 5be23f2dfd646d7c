"""Hybrid models: any pattern of sequence mixers in one stack (model.arch='hybrid', model.mixers).

    model.mixers = "gla*3,transformer"     # with n_layers = 8: gla gla gla transformer gla gla gla transformer

Layer i is exactly the block a pure model of its mixer would have at index i: built from `layer_config(cfg, i)`
(pretrain.config), the model config with that mixer as model.arch, so it keeps the mixer's own options, parameter
names (`layers.3.mixer.q_proj` as in a pure transformer) and initialisation (depth-dependent inits see the layer's
index in the whole stack). Positions follow the mixers: rotary only inside transformer layers (model.pos='rope',
the default when a transformer layer is present), none in FoX, GLA and RWKV-7 layers; learned positions are added
to the shared embedding.

RWKV-7 layers keep their own block (time mix plus channel mix, which replaces model.mlp) and their value residual
comes from the first RWKV-7 layer of the stack, whose values travel as the carry through every later block of
any mixer. The model's ends follow its first layer: when layer 0 is RWKV-7 the model has RWKV-7's ends (the
embedding normalisation `layers.0.emb_norm`, the tiny uniform embedding and orthogonal LM-head init), as a pure
RWKV-7 has; otherwise the ends are the shared ones (normal init, no emb_norm) and a deeper RWKV-7 layer has no
emb_norm either: its input is a residual stream of ordinary scale, not the tiny embedding ln0 exists for.
So a hybrid of one mixer is the pure model, parameter for parameter and bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.config import ModelConfig, check_mixers, layer_config, layer_mixers
from pretrain.models.common import Block, LanguageModel, build_mlp
from pretrain.models.fox import ForgettingAttention
from pretrain.models.gla import GatedLinearAttention
from pretrain.models.rwkv7 import RWKV7Block, RWKV7ChannelMix, RWKV7TimeMix, end_init_steps, hand_on
from pretrain.models.transformer import Attention

# The mixers that use the shared Block(mixer, model.mlp feed-forward); RWKV-7 has a block of its own.
SHARED_BLOCK_MIXERS = {"transformer": Attention, "fox": ForgettingAttention, "gla": GatedLinearAttention}


class CarryingBlock(Block):
    """The shared block for a layer after the first RWKV-7 layer: it passes the carry (that layer's values) on as a
    new tensor on the same storage, as RWKV-7's own blocks do, so FSDP2 never registers its hooks on a view."""

    def forward(self, *args, **kwargs):
        x, carry = super().forward(*args, **kwargs)
        return x, hand_on(carry)  # (B, T, d), the first RWKV-7 layer's values (B, T, H·D)


class HybridModel(LanguageModel):
    """`LanguageModel` whose layer i has mixer `self.mixers[i]`; with RWKV-7's ends when layer 0 is RWKV-7."""

    def __init__(self, cfg: ModelConfig):
        self.mixers = layer_mixers(cfg)
        value_source = self.mixers.index("rwkv7") if "rwkv7" in self.mixers else None

        def make_block(i: int) -> nn.Module:
            view = layer_config(cfg, i)
            if self.mixers[i] == "rwkv7":
                mixer = RWKV7TimeMix(view, i, gives_values=i == value_source)
                return RWKV7Block(mixer, RWKV7ChannelMix(view, i), view, first=i == 0)
            block = CarryingBlock if value_source is not None and i > value_source else Block
            return block(SHARED_BLOCK_MIXERS[self.mixers[i]](view), build_mlp(view), view)

        super().__init__(cfg, make_block=make_block)

    def init_steps(self, generator: torch.Generator | None = None):
        """The shared init and every block's own; with RWKV-7 as layer 0, then RWKV-7's ends (`end_init_steps`, as
        `RWKV7.init_steps` ends, so a hybrid of RWKV-7 alone draws what a pure RWKV-7 draws)."""
        yield from super().init_steps(generator)
        if self.mixers[0] == "rwkv7":
            yield from end_init_steps(self, generator)


def build_hybrid(cfg: ModelConfig) -> HybridModel:
    check_mixers(cfg)  # the pattern and the options every mixer present must accept, before anything is built
    return HybridModel(cfg)
