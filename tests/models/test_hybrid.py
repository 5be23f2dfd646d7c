"""Hybrid models (model.arch='hybrid', model.mixers): the pattern, pure-model equality, hand composition, documents."""

from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, ModelConfig, build_config, layer_config, layer_mixers, read_toml
from pretrain.models import build_model
from pretrain.models.common import Block, build_mlp
from pretrain.models.fox import ForgettingAttention
from pretrain.models.gla import GatedLinearAttention
from pretrain.models.rwkv7 import RWKV7Block, RWKV7ChannelMix, RWKV7TimeMix
from pretrain.models.transformer import Attention
from tests.models.contract import assert_gradients_reach_every_parameter, assert_meta_build_equals_eager, build
from tests.models.test_document_mask import T as DOC_T
from tests.models.test_document_mask import VOCAB as DOC_VOCAB
from tests.models.test_document_mask import assert_packed_equals_alone

VOCAB = 61
TINY = {"d_model": 32, "n_heads": 4, "vocab_size": VOCAB, "seq_len": 32}


def perturb(model: torch.nn.Module) -> None:
    """Every parameter moved by 0.1·N(0, 1): zero-initialised ones (RWKV-7's output projections) would hide a mixer."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def hybrid_config(mixers: str, n_layers: int, **overrides) -> ModelConfig:
    return build_config({}, {"model": {**TINY, "arch": "hybrid", "mixers": mixers, "n_layers": n_layers,
                                       **overrides}}).model


@pytest.mark.parametrize("mixers, n_layers, expected", [
    ("gla*3,transformer", 8, ["gla"] * 3 + ["transformer"] + ["gla"] * 3 + ["transformer"]),
    ("gla,transformer,rwkv7,fox", 4, ["gla", "transformer", "rwkv7", "fox"]),
    (" rwkv7 * 2 , fox ", 6, ["rwkv7", "rwkv7", "fox"] * 2),
    ("gla", 3, ["gla"] * 3),
])
def test_pattern_expands_and_repeats_to_n_layers(mixers, n_layers, expected):
    assert layer_mixers(hybrid_config(mixers, n_layers)) == expected


def test_pure_model_layers_are_its_arch():
    cfg = build_config({}, {"model": {**TINY, "arch": "fox", "n_layers": 3}}).model
    assert layer_mixers(cfg) == ["fox"] * 3 and layer_config(cfg, 1) is cfg


@pytest.mark.parametrize("model, message", [
    ({"mixers": "gla*3,transfomer"}, "'transfomer' is not a mixer. Did you mean 'transformer'?"),
    ({"mixers": "gla*0,transformer"}, "positive whole number"),
    ({"mixers": "gla*x"}, "positive whole number"),
    ({"mixers": "gla,,transformer"}, "'' is not a mixer"),
    ({"mixers": "gla*3,transformer*2"}, "names 5 layers, which does not repeat to model.n_layers=4"),
    ({"mixers": "gla*3"}, "names 3 layers"),
    ({"mixers": ""}, "model.arch='hybrid' needs model.mixers"),
    ({"arch": "gla", "mixers": "gla*3,transformer"}, "set model.arch='hybrid'"),
    ({"mixers": "gla*3,transformer", "attn_impl": "sdpa"}, "not available for gla, a layer of"),
    ({"mixers": "fox,transformer", "attn_impl": "fla"}, "use one every mixer runs: auto, unfused"),
    ({"mixers": "gla,fox", "pos": "rope"}, "model.pos='rope' is for transformer layers"),
])
def test_bad_patterns_and_conflicting_options_are_rejected(model, message):
    values = {**TINY, "arch": "hybrid", "n_layers": 4, **model}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?").replace("*", r"\*")):
        build_config({}, {"model": values})
    # build_model checks a config made in Python too (the pattern errors; options are validate()'s)
    cfg = ModelConfig(**values)
    if "attn_impl" not in model and "pos" not in model and model.get("arch", "hybrid") == "hybrid":
        with pytest.raises(ConfigError):
            build_model(cfg)


def test_positions_follow_the_mixers():
    cfg = hybrid_config("gla,transformer,fox,rwkv7", 4)
    assert cfg.pos == "rope"  # auto: a transformer layer is present, so it gets rotary embeddings
    assert [layer_config(cfg, i).pos for i in range(4)] == ["none", "rope", "none", "none"]
    model = build_model(cfg)
    assert model.layers["1"].mixer.rope_theta == cfg.rope_theta and model.layers["2"].mixer.rope_theta is None
    assert model.pos_emb is None
    assert hybrid_config("gla,fox", 2).pos == "none"
    learned = hybrid_config("gla,transformer", 2, pos="learned")
    assert build_model(learned).pos_emb is not None and build_model(learned).layers["1"].mixer.rope_theta is None


PURE = {
    "transformer": {"arch": "transformer"},
    "transformer-pro": {"arch": "transformer", "pro": True},
    "gpt": {"arch": "transformer", "preset": "gpt", "dropout": 0.0},
    "fox": {"arch": "fox"},
    "fox-pro": {"arch": "fox", "pro": True},
    "gla": {"arch": "gla"},
    "rwkv7": {"arch": "rwkv7"},
    "rwkv7-tied": {"arch": "rwkv7", "tie_embeddings": True},
}


@pytest.mark.parametrize("name", PURE)
def test_one_mixer_pattern_is_the_pure_model_bitwise(name):
    """Same parameter names, same initial values from the same seed, same logits, bit for bit."""
    defaults = {**TINY, "n_layers": 3}
    pure_cfg, pure = build(defaults, **PURE[name])
    arch = PURE[name]["arch"]
    hybrid_cfg, hybrid = build(defaults, **{**PURE[name], "arch": "hybrid", "mixers": arch})
    assert hybrid_cfg.pos == pure_cfg.pos
    pure_state, hybrid_state = pure.state_dict(), hybrid.state_dict()
    assert list(pure_state) == list(hybrid_state)
    for key, value in pure_state.items():
        assert torch.equal(value, hybrid_state[key]), key
    tokens = torch.randint(0, VOCAB, (2, 32))
    assert torch.equal(pure(tokens), hybrid(tokens))


@pytest.mark.parametrize("mixers", ["gla,transformer", "transformer,rwkv7", "rwkv7,fox", "fox,gla"])
def test_two_layer_hybrid_is_its_two_blocks_composed_by_hand(mixers):
    """Each block built on its own, from the pure config of its mixer (rotary only for the transformer), holding the
    hybrid's weights (a strict load: same names and shapes), composed by hand."""
    cfg = hybrid_config(mixers, 2)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    perturb(model)
    first, second = mixers.split(",")

    def pure_config(arch: str) -> ModelConfig:
        return ModelConfig(**{**TINY, "arch": arch, "n_layers": 2})  # pos 'auto': rope for the transformer alone

    def hand_block(arch: str, index: int) -> torch.nn.Module:
        c = pure_config(arch)
        if arch == "rwkv7":  # value residual from the first RWKV-7 layer, whichever index it has
            return RWKV7Block(RWKV7TimeMix(c, index, gives_values=True), RWKV7ChannelMix(c, index), c,
                              first=index == 0)
        mixer = {"transformer": Attention, "fox": ForgettingAttention, "gla": GatedLinearAttention}[arch](c)
        return Block(mixer, build_mlp(c), c)

    blocks = [hand_block(first, 0).double(), hand_block(second, 1).double()]
    for i, block in enumerate(blocks):
        block.load_state_dict({k.removeprefix(f"layers.{i}."): v for k, v in model.state_dict().items()
                               if k.startswith(f"layers.{i}.")}, strict=True)
    tokens = torch.randint(0, VOCAB, (2, 32))
    h = model.tok_emb(tokens)  # (B, T, d)
    carry = None
    for block in blocks:
        h, carry = block(h, carry)
    by_hand = model.lm_head(model.norm(h))  # (B, T, V)
    assert torch.equal(model(tokens), by_hand)


def test_rwkv7_value_residual_comes_from_the_first_rwkv7_layer():
    model = build_model(hybrid_config("gla,rwkv7,transformer,rwkv7", 4))
    assert model.layers["1"].mixer.v_lora is None  # the value source
    assert model.layers["3"].mixer.v_lora is not None
    assert model.layers["1"].emb_norm is None  # ends follow layer 0, a GLA layer: no ln0 anywhere
    first = build_model(hybrid_config("rwkv7,gla", 2))
    assert first.layers["0"].emb_norm is not None and first.layers["0"].mixer.v_lora is None
    # the carry, the source's values, does reach the later RWKV-7 layer through the transformer block (weights
    # perturbed: RWKV-7's zero-initialised output projections would stop gradients at initialisation)
    perturb(model)
    assert_gradients_reach_every_parameter(model, VOCAB)


@pytest.mark.parametrize("mixers", ["gla,transformer,rwkv7,fox", "rwkv7,fox,gla,transformer"])
def test_meta_build_equals_eager(mixers):
    cfg = hybrid_config(mixers, 4)
    assert_meta_build_equals_eager(cfg, build_model(cfg))


@pytest.mark.parametrize("mixers, pro", [("gla,transformer,rwkv7,fox", False), ("rwkv7,fox,gla,transformer", True)])
def test_packed_documents_equal_documents_run_alone(mixers, pro):
    """As tests/models/test_document_mask.py for the pure models: each document of a packed row gives the logits and
    gradients of running it alone, through every mixer of the hybrid (pro: the softmax layers' Pro block)."""
    cfg = build_config({}, {"model": {"d_model": 32, "n_layers": 4, "n_heads": 4, "vocab_size": DOC_VOCAB,
                                      "seq_len": DOC_T, "arch": "hybrid", "mixers": mixers, "pro": pro}}).model
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    perturb(model)
    assert_packed_equals_alone(model)


def test_hybrid_trains():
    """A few optimizer steps on a fixed batch lower the loss: every mixer's gradients point somewhere useful."""
    torch.manual_seed(0)
    model = build_model(hybrid_config("gla,transformer,rwkv7,fox", 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, VOCAB, (4, 32))
    losses = []
    for _ in range(15):
        loss = model(tokens, labels=tokens.roll(-1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


# ------------------------------------------------------------------------ recompute, FLOPs and memory per layer

@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_gradients(mode):
    """Selective recomputation wraps every layer's own mixer's `attend` (whatever the mixer); full, every block."""
    from parallel.recompute import apply_recompute, is_checkpointed

    cfg = hybrid_config("gla,transformer,rwkv7,fox", 4)
    torch.manual_seed(0)
    plain = build_model(cfg).double()
    perturb(plain)
    torch.manual_seed(0)
    recomputed = build_model(cfg).double()
    recomputed.load_state_dict(plain.state_dict())
    apply_recompute(recomputed, mode)
    if mode == "selective":
        assert all(is_checkpointed(block.mixer, "attend") for block in recomputed.layers.values())
    tokens = torch.randint(0, VOCAB, (2, 32))
    for model in (plain, recomputed):
        model(tokens, labels=tokens.roll(-1, 1)).backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12, msg=name)


def test_flops_and_activation_memory_per_layer_are_the_pure_models():
    """Each layer of 'gla*3,transformer' costs (FLOPs per token) and keeps (activation bytes) what a layer of the pure
    model of its mixer does; the totals are the sums; MFU's FLOPs count the hybrid's own mixers."""
    from launch.perfmodel import activation_bytes_by_layer, activation_bytes_per_layer, model_stats
    from pretrain.metrics import flops_by_layer, flops_per_token

    shape = {**TINY, "n_layers": 4, "seq_len": 512}
    hybrid = hybrid_config("gla*3,transformer", 4, seq_len=512)
    gla = build_config({}, {"model": {**shape, "arch": "gla"}}).model
    transformer = build_config({}, {"model": {**shape, "arch": "transformer"}}).model
    layers, head = flops_by_layer(hybrid)
    gla_layers, gla_head = flops_by_layer(gla)
    transformer_layers, _ = flops_by_layer(transformer)
    assert layers == gla_layers[:3] + transformer_layers[3:] and head == gla_head
    assert flops_per_token(hybrid) == sum(layers) + head
    assert flops_per_token(hybrid) == pytest.approx((3 * flops_per_token(gla) + flops_per_token(transformer)) / 4)
    memory = dict(s=512, b=2, t=2, sequence_parallel=True, recompute="none")
    per_layer = activation_bytes_by_layer(hybrid, **memory)
    assert per_layer == [activation_bytes_per_layer(gla, **memory)] * 3 + [activation_bytes_per_layer(transformer,
                                                                                                      **memory)]
    assert activation_bytes_per_layer(hybrid, **memory) == pytest.approx(sum(per_layer) / 4)
    # under full recomputation a block keeps its inputs, RWKV-7's carry among them from the first RWKV-7 layer on:
    # a GLA block before that layer keeps its hidden state only, one after it the carry too (bf16, SP over t = 2)
    full = {**memory, "recompute": "full"}
    rwkv = activation_bytes_by_layer(hybrid_config("gla,rwkv7,gla,rwkv7", 4, seq_len=512), **full)
    assert rwkv == [512 * 2 * 32 * 2 / 2 * n for n in (1, 2, 2, 2)]
    # selective recomputation repeats each layer's own mixer term: a one-mixer hybrid is its pure model
    pure_stats = model_stats(gla, 512)
    assert model_stats(hybrid_config("gla", 4, seq_len=512), 512) == pure_stats
    assert model_stats(hybrid, 512).recompute_flops["selective"] > pure_stats.recompute_flops["selective"]


# ------------------------------------------------------------------------------------------------ shipped configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# parameters (meta build, as pretrain.metrics counts them) that each config's comment states
SHIPPED = {
    "hybrid-gla-340m": ("gla*3,transformer", 341_555_712),
    "hybrid-gla-fox-340m": ("gla*3,fox", 341_580_312),
    "hybrid-gla-1.3b": ("gla*3,transformer", 1_299_674_112),
    "hybrid-rwkv7-340m": ("rwkv7*3,transformer", 405_994_496),
    "hybrid-rwkv7-1.5b": ("rwkv7*3,transformer", 1_480_456_192),
}


def test_every_shipped_hybrid_config_is_tested():
    shipped = {path.stem for path in CONFIGS.glob("hybrid-*.toml")}
    assert shipped == set(SHIPPED) | {f"hybrid-{name}-tiny" for name in ("gla", "gla-fox", "rwkv7")}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_has_its_pattern_and_parameter_count(name):
    from pretrain.metrics import matmul_params

    cfg = build_config(read_toml(CONFIGS / f"{name}.toml")).model
    mixers, params = SHIPPED[name]
    assert cfg.mixers == mixers
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
    embedding = model.tok_emb.weight.numel()
    # the tied head multiplies each token (matmul_params counts it), the embedding lookup does not
    assert matmul_params(cfg) == params - embedding + (embedding if cfg.tie_embeddings else 0)


@pytest.mark.parametrize("name", ["gla", "gla-fox", "rwkv7"])
def test_tiny_config_trains_a_step(name):
    cfg = build_config(read_toml(CONFIGS / f"hybrid-{name}-tiny.toml")).model
    assert len(set(layer_mixers(cfg))) == 2
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    loss = model(tokens, labels=tokens.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_inference_cache_continues_every_mixer():
    """Prefill then one token at a time through an InferenceCache gives the full forward's logits: each layer keeps
    its own mixer's state (keys and values, recurrent states, token shifts) and the carry reaches later layers."""
    from pretrain.models.common import InferenceCache

    torch.manual_seed(0)
    model = build_model(hybrid_config("gla,transformer,rwkv7,fox", 4, pro=True)).double().eval()
    perturb(model)
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(tokens)  # (B, T, V)
        cache = InferenceCache()
        pieces = [model(tokens[:, :12], cache=cache)]
        for t in range(12, 20):
            pieces.append(model(tokens[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-9 * float(full.abs().max()))


@pytest.mark.parametrize("study", ["hybrid-tiny", "hybrid"])
def test_hybrid_studies_expand_to_valid_points(study):
    """The study grids take model.arch/model.mixers like any model field: every point is a valid run, pure parents
    and hybrids side by side."""
    from launch.sweep import expand, load_study, point_config, why_invalid

    loaded = load_study(CONFIGS / "studies" / f"{study}.toml")
    points = expand(loaded)
    assert all(why_invalid(loaded, point) is None for point in points)
    kinds = {(point_config(loaded, p).model.arch, point_config(loaded, p).model.mixers) for p in points}
    assert kinds == {("gla", ""), ("transformer", ""), ("rwkv7", ""), ("hybrid", "gla*3,transformer"),
                     ("hybrid", "rwkv7*3,transformer")}
