"""RWKV-7 "Goose" (Peng et al. 2025), following BlinkDL/RWKV-LM `RWKV-v7/train_temp/src/model.py` (x070) and
fla's `RWKV7Attention`.

Time mix (the sequence mixer), per token with δ = shift(x) − x and x_□ = x + δ ⊙ μ_□ for
□ ∈ {r, w, k, v, a, g}:

    r = x_r W_r,  k = x_k W_k,  v = x_v W_v
    w = −e^{−½} σ(w₀ + tanh(x_w W₁) W₂)          log decay, so the decay e^w lies in (0.545, 1)
    v ← v + (v_first − v) σ(v₀ + x_v V₁ V₂)       value residual from layer 0 (layers > 0; in a hybrid, from
                                                   its first RWKV-7 layer)
    a = σ(a₀ + x_a A₁ A₂),  g = σ(x_g G₁) G₂
    κ̂ = L2norm_head(k ⊙ k_k),  k ← k ⊙ (1 + (a − 1) ⊙ k_a)
    S_t = Diag(e^{w_t}) S_{t−1} − (κ̂_t ⊙ a_t)(κ̂_tᵀ S_{t−1}) + k_tᵀ v_t,  o_t = r_t S_t
    y = W_o ((GroupNorm_head(o) + Σ_head(r ⊙ k ⊙ r_k) v) ⊙ g)

Channel mix (it replaces the block's MLP, so `model.mlp` is unused; its width is still d_model · mlp_ratio
rounded to mlp_multiple_of, 4 · d in the reference): W_down relu(x_k W_up)² with x_k = x + δ ⊙ μ_k.

Layout choices: the per-channel vectors that act on the heads (k_k, k_a, r_k, the GroupNorm affine) are 1-D of
size H·D and w₀, a₀, v₀ are the biases of the LoRA up-projections, so all of them shard with their heads; μ acts
on the (replicated) input channels. The first block also normalises the embeddings (the reference's ln0), as
`layers.0.emb_norm`. Projections have no biases (as in the reference); `model.bias` only reaches the norms.
The token shift is a plain function of the whole (B, T, d) sequence: under sequence parallelism it must run
after the all-gather. Not ported: the reference's L2Wrap logit penalty (its param groups, 2× learning rate on
w₀ included, are pretrain.optim's `rwkv7_reference_groups`).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError, ModelConfig
from pretrain.models.common import (Block, LanguageModel, LayerCache, at_least_fp32, init_by_steps, make_norm,
                                    mlp_hidden_size, orthogonal_weight, shift_tokens, zero_weight)
from pretrain.models.gla import LowRank, linear_mixer_impl, reject_rope
from pretrain.ops.rwkv7 import rwkv7, rwkv7_kappa_step

DECAY_SCALE = math.exp(-0.5)  # w = −e^{−½}·σ(·) ∈ (−0.607, 0): a step keeps at least e^{−0.607} ≈ 0.545 of S
GROUP_NORM_EPS = 64e-5  # the reference's ln_x eps for its 64-wide heads (fla: head_dim · 1e-5)
MIXED_INPUTS = ("r", "w", "k", "v", "a", "g")


def lora_rank(d_model: int, factor: float) -> int:
    """The reference's suggested LoRA width: factor·√d rounded to a multiple of 32, at least 32."""
    return max(32, round(factor * math.sqrt(d_model) / 32) * 32)


def token_shift(x: torch.Tensor, docs=None, *, cache: LayerCache | None = None, name: str = "") -> torch.Tensor:
    """δ_t = x_{t−1} − x_t with x_{−1} = 0 (and 0 before each document start), for x (B, T, d) holding the whole
    sequence. With an inference cache, x_{−1} is the cache's `name` entry (the previous call's last step), and x's
    last step is stored there for the next call."""
    if cache is None:
        return shift_tokens(x, docs) - x  # (B, T, d)
    previous = cache.tensors.get(name)  # (B, 1, d) or None at the first call
    cache.tensors[name] = x[:, -1:].clone()
    return shift_tokens(x, previous=previous) - x  # (B, T, d)


class HeadGroupNorm(nn.Module):
    """GroupNorm with one group per head (a LayerNorm over each head's channels); affine of size H·D."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H, D)
        D = x.shape[-1]
        return F.layer_norm(x, (D,), eps=self.eps) * self.weight.view(-1, D) + self.bias.view(-1, D)


class RWKV7TimeMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, gives_values: bool | None = None):
        """Layer `layer` of cfg.n_layers (its depth shapes the init). `gives_values`: whether this is the first RWKV-7
        layer, whose values every later one mixes in (the value residual); None means layer 0, as in a pure model
        (a hybrid's first RWKV-7 layer may sit deeper)."""
        super().__init__()
        reject_rope(cfg)
        d = cfg.d_model
        self.head_dim = d // cfg.n_heads
        if self.head_dim < 2:
            raise ConfigError(f"RWKV-7 needs a head size d_model/n_heads of at least 2, got {self.head_dim}.")
        self.layer, self.n_layers = layer, cfg.n_layers
        self.impl = linear_mixer_impl(cfg)
        for name in MIXED_INPUTS:
            self.register_parameter(f"mu_{name}", nn.Parameter(torch.empty(d)))
        self.r_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.w_lora = LowRank(d, lora_rank(d, 2.5), d, activation="tanh")  # bias: w₀
        self.a_lora = LowRank(d, lora_rank(d, 2.5), d)  # bias: a₀
        gives_values = layer == 0 if gives_values is None else gives_values
        self.v_lora = None if gives_values else LowRank(d, lora_rank(d, 1.7), d)  # bias: v₀
        self.g_lora = LowRank(d, lora_rank(d, 5.0), d, activation="sigmoid", bias=False)
        self.k_k = nn.Parameter(torch.empty(d))
        self.k_a = nn.Parameter(torch.empty(d))
        self.r_k = nn.Parameter(torch.empty(d))
        self.o_norm = HeadGroupNorm(d, GROUP_NORM_EPS)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None = None, *, docs=None,
                cache: LayerCache | None = None):
        B, T, _ = x.shape
        D = self.head_dim
        delta = token_shift(x, docs, cache=cache, name="time_shift")  # (B, T, d)
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, delta, getattr(self, f"mu_{n}")) for n in MIXED_INPUTS)
        r = self.r_proj(xr).view(B, T, -1, D)  # (B, T, H, D), H = local heads
        # fp32 log decay: its cumulative sums inside the op span whole chunks
        w = -DECAY_SCALE * torch.sigmoid(at_least_fp32(self.w_lora(xw))).view(B, T, -1, D)  # (B, T, H, D)
        k = self.k_proj(xk)  # (B, T, H·D)
        v = self.v_proj(xv)  # (B, T, H·D)
        if self.v_lora is None:
            v_first = v  # layer 0 hands its values to every later layer
        elif v_first is None:
            raise ValueError("RWKV-7 layers after the first need the first layer's values as their carry")
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(self.v_lora(xv)))  # (B, T, H·D)
        a = torch.sigmoid(self.a_lora(xa))  # (B, T, H·D): in-context learning rate
        g = self.g_lora(xg)  # (B, T, H·D): output gate
        kk = F.normalize((k * self.k_k).view(B, T, -1, D), dim=-1)  # (B, T, H, D): κ̂, unit length per head
        k = k * (1 + (a - 1) * self.k_a)  # (B, T, H·D)
        k, v, a = (t.view(B, T, -1, D) for t in (k, v, a))  # (B, T, H, D) each
        if cache is None:
            o = self.attend(r, w, k, v, -kk, kk * a, docs)  # (B, T, H, D)
        elif T == 1:  # decoding one token: the plain recurrent step on the cached state (B, H, D, D)
            o, cache.tensors["state"] = rwkv7_kappa_step(r, w, k, v, kk, a, initial_state=cache.tensors.get("state"),
                                                         impl=self.impl)
        else:  # prefill: the chunked recurrence, continuing from the cached state, constant cost per token
            o, cache.tensors["state"] = rwkv7(r, w, k, v, -kk, kk * a, impl=self.impl,
                                              initial_state=cache.tensors.get("state"), output_final_state=True)
        bonus = (r * k * self.r_k.view(-1, D)).sum(-1, keepdim=True) * v  # (B, T, H, D): the current token's own term
        o = self.o_norm(o) + bonus  # (B, T, H, D)
        return self.o_proj(o.flatten(2) * g), v_first

    def attend(self, r, w, k, v, a, b, docs=None):
        """The chunked recurrence alone, as its own method (named like the softmax mixers' `attend`) so that it
        can be recomputed in backward without the projections around it. Document starts reset its state."""
        return rwkv7(r, w, k, v, a, b, impl=self.impl, docs=docs)  # (B, T, H, D)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        init_by_steps(self, generator)

    def init_steps(self, generator: torch.Generator | None = None):
        """The reference's init, as steps of one submodule's own parameters each (see `LanguageModel.init_steps`;
        random draws in the reference's order): per-channel ramps that vary with depth, zero-start LoRAs,
        orthogonal matrices, and a zero output projection, so every block starts as the identity."""
        yield "", RWKV7TimeMix._init_vectors
        for lora in ("w_lora", "a_lora", "v_lora", "g_lora"):
            if getattr(self, lora) is not None:
                yield f"{lora}.down", zero_weight
                yield f"{lora}.up", partial(self._init_lora_up, lora=lora, generator=generator)
        for name, gain in (("r_proj", 1.0), ("k_proj", 0.1), ("v_proj", 1.0)):
            yield name, partial(orthogonal_weight, gain=gain, generator=generator)
        yield "o_proj", zero_weight
        yield "o_norm", partial(_init_output_norm, scale=((self.layer + 1) / self.n_layers) ** 0.7)

    def _init_vectors(self) -> None:
        """The mixer's own parameters: μ, k_k, k_a, r_k (of this module, or of a copy holding only them)."""
        d = self.r_proj.in_features
        shallowness = 1.0 - self.layer / self.n_layers  # 1 → 1/L
        ramp = torch.arange(d, device=self.mu_r.device) / d  # (d,) in [0, 1)
        # μ near 1 (mostly the previous token) on early channels of early layers, near 0 deep in the stack
        for name, power in zip(MIXED_INPUTS, (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):
            getattr(self, f"mu_{name}").copy_(1.0 - ramp ** (power * shallowness))
        self.k_k.copy_(0.71 - 0.1 * self._channel_curves(self.k_k.device)[0])
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)

    def _channel_curves(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(linear, zigzag, decay_speed), each (C,) over the output channels: the reference's per-channel shapes."""
        C, D = self.r_proj.out_features, self.head_dim
        depth = self.layer / max(self.n_layers - 1, 1)  # 0 → 1 over the layers
        n = torch.arange(C, device=device, dtype=torch.float32)
        linear = n / (C - 1) - 0.5  # (C,) −½ → ½ across channels
        zigzag = ((n % D) - (D - 1) / 2) / ((D - 1) / 2)  # (C,) −1 → 1 within each head
        zigzag = zigzag * zigzag.abs()
        decay_speed = -6 + 6 * (n / (C - 1)) ** (1 + depth ** 0.3)  # (C,) slow → fast decay across channels
        return linear, zigzag, decay_speed

    def _init_lora_up(self, up: nn.Linear, *, lora: str, generator: torch.Generator | None) -> None:
        """`up`, the up-projection of LoRA `lora` (or a copy of its parameters): orthogonal ×0.1 (with the zero
        down-projection the LoRA term starts at 0, yet gets gradient), and its bias w₀, a₀ or v₀."""
        out, rank = up.weight.shape
        orthogonal_weight(up, gain=0.1 * (math.sqrt(rank / out) if rank > out else 1.0), generator=generator)
        if up.bias is not None:
            linear, zigzag, decay_speed = self._channel_curves(up.bias.device)
            up.bias.copy_({"w_lora": decay_speed + 0.5 + 2.5 * zigzag, "a_lora": -0.19 + 0.3 * zigzag + 0.4 * linear,
                           "v_lora": 0.73 - 0.4 * linear}[lora])


def _init_output_norm(norm: HeadGroupNorm, *, scale: float) -> None:
    norm.weight.fill_(scale)
    nn.init.zeros_(norm.bias)


class RWKV7ChannelMix(nn.Module):
    """down(relu(up(x + δ ⊙ μ_k))²): RWKV-7's feed-forward, with its own token shift."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.d_model
        self.layer, self.n_layers = layer, cfg.n_layers
        self.mu_k = nn.Parameter(torch.empty(d))
        self.up_proj = nn.Linear(d, mlp_hidden_size(cfg), bias=False)
        self.down_proj = nn.Linear(mlp_hidden_size(cfg), d, bias=False)

    def forward(self, x: torch.Tensor, docs=None, cache: LayerCache | None = None) -> torch.Tensor:
        h = torch.addcmul(x, token_shift(x, docs, cache=cache, name="channel_shift"), self.mu_k)  # (B, T, d)
        return self.down_proj(F.relu(self.up_proj(h)).square())

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        init_by_steps(self, generator)

    def init_steps(self, generator: torch.Generator | None = None):
        """μ_k from a ramp that varies with depth, an orthogonal up-projection and a zero down-projection (steps as
        `LanguageModel.init_steps`)."""
        yield "", RWKV7ChannelMix._init_mu
        yield "up_proj", partial(orthogonal_weight, gain=1.0, generator=generator)
        yield "down_proj", zero_weight

    def _init_mu(self) -> None:
        d = self.mu_k.shape[0]
        shallowness = 1.0 - self.layer / self.n_layers
        self.mu_k.copy_(1.0 - (torch.arange(d, device=self.mu_k.device) / d) ** (shallowness ** 4))


class _HandOn(torch.autograd.Function):
    """The identity, returning a new tensor on the input's storage (and version counter) instead of the input itself.

    A block after the first returns the carry it was given. Wrapped by FSDP2, it is given a view FSDP2 made of the
    carry (its post-backward hook on the inputs), so it would return a view, on which FSDP2 then registers its
    pre-backward hook: an in-place op on a view drops such a hook, and FSDP2 warns. This tensor is no view and copies
    nothing (the carry is a (B, T, d) activation that every later layer keeps for backward); an in-place op on it
    changes the version that those layers saved it at, so autograd refuses it."""

    @staticmethod
    def forward(ctx, carry: torch.Tensor) -> torch.Tensor:
        return carry.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def hand_on(carry: torch.Tensor) -> torch.Tensor:
    """The carry a block returns (the first RWKV-7 layer's values, (B, T, H·D)): the same values and storage as a new
    tensor that is no view (see `_HandOn`). Every block after the first RWKV-7 layer returns its carry through this,
    of any mixer (hybrid blocks too)."""
    return _HandOn.apply(carry)


class RWKV7Block(Block):
    """The shared pre-norm block; the first one also normalises the (tiny-initialised) embeddings (ln0)."""

    def __init__(self, mixer: nn.Module, mlp: nn.Module, cfg: ModelConfig, *, first: bool):
        super().__init__(mixer, mlp, cfg)
        self.emb_norm = make_norm(cfg) if first else None

    def forward(self, x: torch.Tensor, carry: torch.Tensor | None = None, *, docs=None,
                cache: LayerCache | None = None):
        if self.emb_norm is not None:
            x = self.emb_norm(x)  # (B, T, d)
        x, carry = super().forward(x, carry, docs=docs, cache=cache)
        return x, hand_on(carry)  # (B, T, d), the first layer's values (B, T, H·D)


class RWKV7(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        # The channel mix takes the place of the shared MLP (same names: layers.<i>.mixer / .mlp / norms).
        super().__init__(cfg, make_block=lambda i: RWKV7Block(RWKV7TimeMix(cfg, i), RWKV7ChannelMix(cfg, i), cfg,
                                                              first=i == 0))

    def init_steps(self, generator: torch.Generator | None = None):
        """Shared init plus every block's own, then RWKV-7's ends (`end_init_steps`)."""
        yield from super().init_steps(generator)
        yield from end_init_steps(self, generator)


def end_init_steps(model: LanguageModel, generator: torch.Generator | None = None):
    """RWKV-7's init of a model's ends, as steps (`LanguageModel.init_steps`) that follow the shared ones: the
    reference's embedding (uniform ±1e-4, which the first block's emb_norm rescales) and orthogonal LM head, each
    where the model (or its pipeline stage) has it; a tied embedding keeps the shared normal init. A pure RWKV-7 and
    a hybrid whose layer 0 is RWKV-7 both end with these."""
    if model.cfg.tie_embeddings:
        return
    if model.tok_emb is not None:
        yield "tok_emb", partial(_uniform_embedding, generator=generator)
    if model.lm_head is not None:
        yield "lm_head", partial(_orthogonal_head, generator=generator)


def _uniform_embedding(embedding: nn.Embedding, *, generator: torch.Generator | None) -> None:
    nn.init.uniform_(embedding.weight, -1e-4, 1e-4, generator=generator)


def _orthogonal_head(lm_head: nn.Linear, *, generator: torch.Generator | None) -> None:
    V, d = lm_head.weight.shape
    orthogonal_weight(lm_head, gain=0.5 * math.sqrt(V / d) if V > d else 0.5, generator=generator)


def build_rwkv7(cfg: ModelConfig) -> RWKV7:
    return RWKV7(cfg)
