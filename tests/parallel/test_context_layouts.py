"""Context parallelism trains like one process: over 5 optimizer steps the losses and the final parameters equal a
single-process run on the whole sequences within 1e-5 (float32, gloo), for the four architectures (Transformer and
FoX with the Pro block, whose KV-shift needs the previous rank's key and value), with and without document masking,
alone (cp2, cp4) and composed with tensor + sequence, pipeline and data parallelism, recomputation and mini-sequence
chunks. The tiny models see T = 16, so at cp2 each rank holds chunks of 4 steps and at cp4 of 2."""

import functools
import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.context import ContextShard
from parallel.context_model import _softmax_attend, global_mean_loss
from parallel.minisequence import _ChunkedVocabParallelLoss, chunked_loss
from parallel.mesh import ParallelDims
from parallel.tensor import vocab_parallel_cross_entropy
from pretrain.config import ConfigError, build_config
from tests.dist import run_distributed
from pretrain.train import train_step
from tests.parallel.layouts import (ARCHS, assert_same_training, build, global_batch, local_micro_batches, tiny_config,
                                    train_layouts)


@functools.cache
def reference(archs: tuple, train_json: str, model_json: str, documents: bool) -> dict:
    return train_layouts(archs, {}, json.loads(train_json), documents=documents, model_overrides=json.loads(model_json))


def check(world: int, parallel: dict, *, documents: bool, train: dict | None = None, archs=ARCHS,
          model: dict | None = None) -> None:
    train, model = train or {}, model or {}
    layouts = functools.partial(train_layouts, documents=documents, model_overrides=model)
    results = run_distributed(layouts, world, archs, parallel, train)
    assert_same_training(results, reference(archs, json.dumps(train, sort_keys=True),
                                            json.dumps(model, sort_keys=True), documents), archs)


@pytest.mark.parametrize("documents", [False, True], ids=["whole-rows", "documents"])
def test_cp2_every_architecture(documents):
    check(2, {"cp": 2}, documents=documents)


@pytest.mark.parametrize("model", [{"pro": False}, {"pro": False, "pos": "learned"}], ids=["rope", "learned"])
def test_cp2_positions_are_global(model):
    """Rotary and learned positions of a rank's steps are their places in the whole row (the Pro block's KV-shift is
    off here: nothing but the positions tells the ranks' chunks apart)."""
    check(2, {"cp": 2}, documents=False, archs=("transformer",), model=model)


def test_cp2_ddp_selective_recompute_and_minisequence_chunks():
    """The recomputed CP op runs its ring / scan again in backward; MsT pieces (3 over the 8 local steps, one across
    the rank's two chunks) fetch the step before them from the whole input; DDP reduces over cp."""
    check(2, {"cp": 2, "data_parallel": "ddp", "recompute": "selective", "recompute_modules": "mlp",
              "minisequence_chunks": 3}, documents=True)


def test_cp2_full_recompute():
    check(2, {"cp": 2, "recompute": "full"}, documents=True, archs=("fox", "rwkv7"))


@pytest.mark.slow
@pytest.mark.parametrize("archs", [("transformer", "gla"), ("fox", "rwkv7")], ids=["softmax-linear", "fox-rwkv7"])
def test_cp4(archs):
    check(4, {"cp": 4}, documents=True, archs=archs)


@pytest.mark.slow
@pytest.mark.parametrize("parallel, train", [
    pytest.param({"cp": 2, "tp": 2}, {}, id="cp2-tp2-sp"),
    pytest.param({"cp": 2, "pp": 2}, {}, id="cp2-pp2-1f1b"),
    pytest.param({"cp": 2, "dp": 2}, {"micro_batch": 2}, id="cp2-dp2-fsdp"),
])
def test_cp2_composed(parallel, train):
    check(4, parallel, documents=True, train=train)


@pytest.mark.slow
@pytest.mark.parametrize("parallel, archs", [
    # HSDP: replicated over dp_replicate, sharded over dp_shard × cp (= cp here)
    pytest.param({"cp": 2, "dp_replicate": 2}, ("transformer", "gla"), id="cp2-hsdp-r2"),
    pytest.param({"cp": 2, "pp": 2, "pp_schedule": "interleaved_1f1b"}, ("fox", "rwkv7"), id="cp2-pp2-interleaved"),
    # FSDP over the cp ranks: zero bubble's split backward needs the stage's weights kept gathered (parallel.pipeline)
    pytest.param({"cp": 2, "pp": 2, "pp_schedule": "zero_bubble"}, ("transformer", "gla"), id="cp2-pp2-zero-bubble"),
])
def test_cp2_more_layouts(parallel, archs):
    check(4, parallel, documents=True, train={"micro_batch": 2}, archs=archs)


@pytest.mark.slow
def test_cp2_tp2_without_sequence_parallelism_and_minisequence_chunks():
    """TP without SP all-reduces the mixer input's gradient; the vocab-parallel chunked loss sits under the CP loss."""
    check(4, {"cp": 2, "tp": 2, "sequence_parallel": False, "minisequence_chunks": 2}, documents=False,
          archs=("rwkv7",))


def _first_step_grad_norms(parallel: dict) -> dict[str, float]:
    """The gradient norm of each architecture's first step (clipping measures it over every shard)."""
    norms = {}
    for arch in ARCHS:
        cfg = tiny_config(arch, parallel)
        cfg.data.document_mask = True
        world = dist.get_world_size() if dist.is_initialized() else 1
        dims = ParallelDims.from_config(cfg, world)
        mesh = dims.build_mesh("cpu") if world > 1 else None
        model, optimizers = build(cfg, mesh)
        dp_rank = mesh.get_local_rank("dp") if mesh is not None else 0
        micro_batches = local_micro_batches(global_batch(1, cfg, documents=True), cfg, dp_rank=dp_rank, dp=dims.dp)
        _, norm = train_step(model, optimizers, micro_batches, lr=1e-3, grad_clip=0.0,
                             autocast=torch.autocast("cpu", enabled=False))
        norms[arch] = norm.item()
    return norms


@pytest.mark.parametrize("data_parallel", ["fsdp", "ddp"])
def test_the_gradient_norm_counts_each_parameter_once(data_parallel):
    """Parameters are replicated over cp and FSDP shards them over dp_shard × cp: the norm clipping uses is the
    one-process one (not cp times a rank's share, nor the replicas' sum)."""
    reference = _first_step_grad_norms({})
    for norms in run_distributed(_first_step_grad_norms, 2, {"cp": 2, "data_parallel": data_parallel}):
        for arch in ARCHS:
            assert abs(norms[arch] - reference[arch]) < 1e-5 * reference[arch], (arch, norms[arch], reference[arch])


def _hidden_head_and_labels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, d) hidden states, a (V, d) head and (B, T) labels of 2 rows of 8 steps whose chunks 1 and 2 (all of cp
    rank 1's steps at cp2) are ignored: rank 1's own mean is 0/0."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 8, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 8), generator=g)
    labels[:, 2:6] = -100
    return h, weight, labels


def _cp_loss_and_gradient(loss_kind: str) -> tuple[float, torch.Tensor]:
    """This cp rank's global mean loss and the gradient of its hidden steps, with the loss that `loss_kind` names:
    F.cross_entropy, the mini-sequence chunked loss, or (on 4 processes: cp2 × tp2) the vocab-parallel loss, plain
    or chunked. Under tp each tp rank holds half the head's rows and the h gradient is summed over tp."""
    world = dist.get_world_size()
    tp = 2 if loss_kind.startswith("tp") else 1
    groups = {name: [dist.new_group(ranks) for ranks in rank_lists] for name, rank_lists in (
        ("cp", [list(range(t, world, tp)) for t in range(tp)]), ("tp", [list(range(c, c + tp)) for c in
                                                                        range(0, world, tp)]))}
    rank = dist.get_rank()
    cp_group, tp_group = groups["cp"][rank % tp], groups["tp"][rank // tp]
    shard = ContextShard.from_group(cp_group)
    h, weight, labels = _hidden_head_and_labels()
    local, local_labels = shard.split(h).requires_grad_(), shard.split(labels)
    rows = weight.shape[0] // tp
    vocab_start = rows * (rank % tp)
    if loss_kind == "cross_entropy":
        local_mean = F.cross_entropy(F.linear(local, weight).flatten(0, 1), local_labels.flatten(), ignore_index=-100)
    elif loss_kind == "minisequence":
        head = torch.nn.Linear(4, 6, bias=False, dtype=torch.float64)
        head.weight.data.copy_(weight)
        local_mean = chunked_loss(head, local, local_labels, chunks=2)
    elif loss_kind == "tp2":
        logits = F.linear(local, weight[vocab_start:vocab_start + rows]).flatten(0, 1)  # (N, V / tp)
        local_mean = vocab_parallel_cross_entropy(logits, local_labels.flatten(), vocab_start=vocab_start,
                                                  group=tp_group)
    else:  # tp2 with mini-sequence chunks
        local_mean = _ChunkedVocabParallelLoss.apply(local.flatten(0, 1), local_labels.flatten(),
                                                     weight[vocab_start:vocab_start + rows], 2, vocab_start, tp_group)
    loss = global_mean_loss(local_mean, local_labels, shard)
    loss.backward()
    grad = local.grad
    dist.all_reduce(grad, group=tp_group)  # each tp rank's share of the h gradient
    return loss.item(), grad


@pytest.mark.parametrize("loss_kind, world", [("cross_entropy", 2), ("minisequence", 2), ("tp2", 4),
                                              ("tp2_minisequence", 4)])
def test_the_loss_is_the_whole_mean_even_where_a_rank_has_no_labels(loss_kind, world):
    """Every rank reports the whole sequence's mean, and its gradient is cp × the one-process one at its steps (data
    parallelism's average over the cp ranks then gives the one-process gradient of a shared parameter), with each
    loss the model may compute: a rank without labels gets a zero gradient, not 0/0."""
    results = run_distributed(_cp_loss_and_gradient, world, loss_kind)
    h, weight, labels = _hidden_head_and_labels()
    h.requires_grad_()
    full = F.cross_entropy(F.linear(h, weight).flatten(0, 1), labels.flatten(), ignore_index=-100)
    full.backward()
    tol = 1e-12 if loss_kind == "cross_entropy" else 1e-6  # the chunked and vocab-parallel losses compute in fp32
    for rank, (loss, grad) in enumerate(results):
        assert abs(loss - full.item()) < tol
        tp = world // 2
        shard = ContextShard(group=None, rank=rank // tp, size=2)  # ranks: cp rank × tp + tp rank
        torch.testing.assert_close(grad / 2, shard.split(h.grad), rtol=0, atol=tol)


def config(parallel: dict, **model):
    base = tiny_config("transformer", parallel).to_dict()
    return build_config({"model": {**base["model"], **model}, "parallel": base["parallel"], "train": base["train"],
                         "optim": base["optim"]})


@pytest.mark.parametrize("parallel, model, message", [
    ({"cp": 2}, {"seq_len": 18}, r"seq_len=18 is not divisible by 2 × parallel.cp = 4"),
    ({"cp": 4}, {"seq_len": 20}, r"seq_len=20 is not divisible by 2 × parallel.cp = 8"),
    ({"cp": 2}, {"dropout": 0.1}, r"model.dropout=0.1 also drops softmax-attention probabilities.*model.dropout=0"),
    ({"cp": 2}, {"arch": "hybrid", "mixers": "gla,transformer", "dropout": 0.1},
     r"model.dropout=0.1 also drops softmax-attention probabilities"),
    ({"cp": 2, "tp": 4}, {"seq_len": 20}, r"seq_len / cp = 20 / 2 = 10 steps, not divisible by parallel.tp=4"),
    ({"cp": 0}, {}, r"parallel.cp must be >= 1"),
    ({"cp": 2, "compile": True}, {}, r"parallel.compile with parallel.cp=2 is not supported"),
])
def test_config_errors(parallel, model, message):
    with pytest.raises(ConfigError, match=message):
        config(parallel, **model)


def test_ring_attention_refuses_a_mixer_that_drops_probabilities():
    """The guard behind the config check: a softmax mixer training with dropout is refused, not run without it."""
    mixer = SimpleNamespace(training=True, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match=r"no attention-probability dropout \(dropout_p=0.1\)"):
        _softmax_attend(mixer, ContextShard(group=None, rank=0, size=2), None, None, None, None)


def test_world_counts_cp():
    dims = ParallelDims.from_config(config({"cp": 2, "tp": 2}), 8)
    assert (dims.dp, dims.cp, dims.tp, dims.world_size) == (2, 2, 2, 8)
    with pytest.raises(ConfigError, match=r"tp × pp × cp = 2 × 1 × 2 = 4 does not divide the 6 processes"):
        ParallelDims.from_config(config({"cp": 2, "tp": 2}), 6)
