"""Activation recomputation changes memory, never results: every mode gives the plain path's loss and gradients
bitwise (float32, CPU), dropout masks included, on one process and under tp=2 + SP, pp=2 and FSDP2 (within the
layout tests' 1e-5); and the saved bytes per layer match Korthikanti et al.'s formulas term by term, on one process
and per rank under tp=2 with and without SP."""

import functools

import pytest
import torch

from bench.memory import (GPT_ROWS, arch_bytes_per_token, cpu_extra_bytes, formula_bytes, gpt_row, per_layer_bytes,
                          tp_rows_on_rank)
from parallel.parallelize import parallelize
from parallel.recompute import apply_recompute
from pretrain.config import ConfigError, build_config
from pretrain.models import build_model
from tests.dist import run_distributed
from tests.parallel.layouts import ARCHS, assert_same_training, tiny_config, train_layouts

MODES = [
    pytest.param("selective", {}, id="selective"),
    pytest.param("selective", {"modules": ("mlp", "norm")}, id="selective-mlp-norm"),
    pytest.param("full", {}, id="full"),
    pytest.param("full", {"every": 2, "first": 3}, id="full-every2-first3"),
]


def loss_and_grads(cfg, prepare=lambda model: None):
    """Loss and gradients of one forward + backward of a fresh model that `prepare` changed after initialisation."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    prepare(model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len), generator=g)
    labels[:, :3] = -100
    torch.manual_seed(2)  # the dropout masks
    loss = model(tokens, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model


def recomputed(mode, **kwargs):
    return lambda model: apply_recompute(model, mode, **kwargs)


def assert_identical(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name, grad in a[1].items():
        assert torch.equal(grad, b[1][name]), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode, kwargs", MODES)
def test_same_loss_and_grads(arch, mode, kwargs):
    cfg = tiny_config(arch)
    assert_identical(loss_and_grads(cfg, recomputed(mode, **kwargs)), loss_and_grads(cfg))


@pytest.mark.parametrize("mode, kwargs", MODES)
def test_gpt_dropout_masks_are_replayed(mode, kwargs):
    """The gpt preset (dropout 0.1 on attention probabilities and residual branches, unfused attention)."""
    cfg = build_config({"model": {"preset": "gpt", "d_model": 32, "n_layers": 4, "n_heads": 4, "vocab_size": 67,
                                  "seq_len": 16}})
    plain = loss_and_grads(cfg)
    assert_identical(loss_and_grads(cfg, recomputed(mode, **kwargs)), plain)
    assert not torch.equal(plain[0], loss_and_grads(build_config({**cfg.to_dict(), "model": {
        **cfg.to_dict()["model"], "dropout": 0.0}}))[0])  # dropout is really on


def test_state_dict_keys_unchanged():
    cfg = tiny_config("transformer")
    keys = loss_and_grads(cfg)[2].state_dict().keys()
    for mode, kwargs in (("selective", {"modules": ("mlp", "norm")}), ("full", {})):
        assert loss_and_grads(cfg, recomputed(mode, **kwargs))[2].state_dict().keys() == keys


def test_bad_settings():
    model = build_model(tiny_config("gla").model)
    with pytest.raises(ValueError, match="no submodule"):
        apply_recompute(model, "selective", modules=("nope",))
    with pytest.raises(ValueError, match="recompute mode"):
        apply_recompute(model, "partial")
    with pytest.raises(ConfigError, match="recompute"):
        build_config({"parallel": {"recompute": "some"}})
    with pytest.raises(ConfigError, match="recompute_modules"):
        build_config({"parallel": {"recompute_modules": "mlp"}})


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_saved_bytes_match_korthikanti(mode):
    """Saved bytes per gpt layer (bf16, unfused) = the paper's formula plus this CPU build's explained terms."""
    s, b, h, a = 32, 2, 48, 4
    measured = per_layer_bytes(mode, seq=s, batch=b, d_model=h, heads=a)
    extra = cpu_extra_bytes(mode, s=s, b=b, h=h, a=a)
    assert measured == formula_bytes(mode, s=s, b=b, h=h, a=a) + sum(extra.values()), (measured, extra)


def test_tensor_parallel_saved_bytes_match_korthikanti():
    """TP, TP+SP, TP+selective, TP+SP+selective (t = 2, the training run's plan): each rank's saved bytes per gpt
    layer = sbh(10 + 24/t + 5as/(ht)), sbh(34/t + 5as/(ht)), sbh(10 + 24/t), 34sbh/t plus the explained terms; the SP
    rows with sp_regather (the default) and without it (plus the gathered inputs kept whole)."""
    s, b, h, a = 32, 2, 48, 4
    names = [name for name, (tensor_parallel, *_) in GPT_ROWS.items() if tensor_parallel]
    ranks = run_distributed(tp_rows_on_rank, 2, names, s, b, h, a)
    for name in names:
        row = gpt_row(name, [r[name] for r in ranks], s=s, b=b, h=h, a=a)
        assert len(set(row["measured_bytes_per_rank"])) == 1, row  # heads and sequence split evenly
        assert row["unexplained_bytes"] == 0, row


@pytest.mark.parametrize("arch", ["gla", "rwkv7"])
def test_linear_mixers_selective_recomputes_the_recurrence(arch):
    """Selective wraps only the chunked recurrence (`mixer.attend`): its intra-chunk tensors are not kept, the
    projections, gates and norms around it are, so it keeps less than none and more than full recomputation."""
    model = build_model(tiny_config(arch).model)
    apply_recompute(model, "selective")
    mixer = model.layers["0"].mixer
    assert isinstance(mixer.__dict__.get("attend"), functools.partial) and "_call_impl" not in mixer.__dict__
    saved = {mode: arch_bytes_per_token(arch, mode, mst=1, seq=64, dtype=torch.bfloat16)
             for mode in ("none", "selective", "full")}
    assert saved["full"] < saved["selective"] < saved["none"], saved


TRAIN = {"micro_batch": 2}
STEPS = 2  # enough to see gradients, optimizer state and a second forward agree; keeps the file fast


@functools.cache
def reference(archs: tuple[str, ...]) -> dict:
    return train_layouts(archs, {}, TRAIN, STEPS)


def test_parallelize_applies_config_on_one_process():
    cfg = tiny_config("transformer", {"recompute": "full", "recompute_every": 2, "minisequence_chunks": 2})
    model = build_model(cfg.model)
    parallelize(model, cfg, None, device=torch.device("cpu"))
    wrapped = [isinstance(block.forward, functools.partial) for block in model.layers.values()]
    assert wrapped == [True, False, True, False]
    assert isinstance(model.loss, functools.partial)
    assert_same_training([train_layouts(ARCHS, {"recompute": "full", "recompute_every": 2}, TRAIN, STEPS)],
                         reference(ARCHS), ARCHS)


# Selective wraps each architecture differently, so all four run; full wraps whole blocks alike, so two suffice
# (the transformer, and RWKV-7 with its carry between blocks).
@pytest.mark.parametrize("parallel, archs", [
    pytest.param({"tp": 2, "recompute": "selective", "recompute_modules": "mlp,norm"}, ARCHS, id="tp2-sp-selective"),
    pytest.param({"tp": 2, "recompute": "full"}, ("transformer", "rwkv7"), id="tp2-sp-full"),
    pytest.param({"pp": 2, "recompute": "full", "recompute_every": 2}, ("rwkv7",), id="pp2-full-every2"),
    pytest.param({"pp": 2, "recompute": "selective", "minisequence_chunks": 2}, ARCHS, id="pp2-selective-mst"),
    # FSDP2's hooks stay outside the checkpointed blocks and gather the parameters again for the recomputation
    pytest.param({"dp": 2, "recompute": "selective", "recompute_modules": "mlp,norm", "minisequence_chunks": 2},
                 ("transformer", "rwkv7"), id="dp2-fsdp-selective-mst"),
])
def test_two_processes(parallel, archs):
    results = run_distributed(train_layouts, 2, archs, parallel, TRAIN, STEPS)
    assert_same_training(results, reference(ARCHS), archs)


def test_config_selects_the_first_blocks_for_full_recompute():
    from parallel.parallelize import parallelize
    from pretrain.config import build_config
    from pretrain.models import build_model

    cfg = build_config({}, {"model": {"d_model": 32, "n_layers": 4, "n_heads": 4},
                            "parallel": {"recompute": "full", "recompute_first": 2}})
    model = parallelize(build_model(cfg.model), cfg, None, device=torch.device("cpu")).parts[0]
    wrapped = [isinstance(block.__dict__.get("forward"), functools.partial) for block in model.layers.values()]
    assert wrapped == [True, True, False, False]
