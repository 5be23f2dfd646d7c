"""`parallel.sp_regather`: under tp=2 + sequence parallelism each mixer and MLP keeps its input's sequence shard and
gathers it again in backward (Megatron's layout). Losses and gradients are bitwise those of keeping the gathered
input, for all four architectures, under autocast, with pipelining (zero-bubble's split backward) and with FSDP2;
the saved bytes per layer drop by the gathered-input term, 2 · (2sbh − 2sbh/t)."""

import warnings

import numpy as np
import pytest
import torch
from torch.distributed.tensor import DTensor

from bench.memory import saved_bytes, tp_rows_on_rank
from parallel.mesh import ParallelDims
from parallel.parallelize import parallelize
from parallel.recompute import is_checkpointed
from pretrain.models import build_model
from tests.dist import run_distributed
from tests.parallel.layouts import ARCHS, tiny_config, train_layouts


def _step(arch: str, parallel: dict, *, autocast: bool) -> tuple[torch.Tensor, dict, int]:
    """Loss, full gradients and this rank's saved bytes of one forward and two backward passes (the graph kept
    after the first, as zero-bubble pipelining's input and weight passes do: each gathers again) of a tiny tp=2
    model."""
    cfg = tiny_config(arch, {"tp": 2, **parallel})
    mesh = ParallelDims.from_config(cfg, 2).build_mesh("cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    model = parallelize(model, cfg, mesh, device=torch.device("cpu")).parts[0]
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        nbytes = saved_bytes(model, tokens, tokens)
        loss = model(tokens, labels=tokens)
    loss.backward(retain_graph=True)
    loss.backward()
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}
    return loss.detach(), grads, nbytes


def _on_and_off(cases) -> dict:
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
    out = {}
    for arch, autocast in cases:
        on, off = (_step(arch, {"sp_regather": flag}, autocast=autocast) for flag in (True, False))
        same = torch.equal(on[0], off[0]) and all(torch.equal(g, off[1][n]) for n, g in on[1].items())
        out[arch, autocast] = same, on[2], off[2]
    return out


def test_same_loss_and_grads_less_memory():
    """All four architectures in fp32, two under CPU autocast (bf16): there autograd saves each linear's bf16 copy of
    the gathered input, which sp_regather keeps as the shard too."""
    cases = [(arch, False) for arch in ARCHS] + [("transformer", True), ("rwkv7", True)]
    for (arch, autocast), (same, on, off) in run_distributed(_on_and_off, 2, cases)[0].items():
        assert same, (arch, autocast)
        # RWKV-7 saves no view of its inputs: its token-shift mixing makes new tensors first
        assert on < off if arch != "rwkv7" else on == off, (arch, autocast, on, off)


def test_saved_bytes_drop_by_the_gathered_inputs():
    """gpt preset, bf16, t = 2: the attention's and the MLP's gathered inputs (2sbh each) become shards (2sbh/t)."""
    s, b, h, a, t = 32, 2, 48, 4, 2
    rows = ["tp+sp", "tp+sp, gathered kept", "tp+sp+selective", "tp+sp+selective, gathered kept"]
    for rank in run_distributed(tp_rows_on_rank, t, rows, s, b, h, a):
        for mode in ("tp+sp", "tp+sp+selective"):
            assert rank[f"{mode}, gathered kept"] - rank[mode] == 2 * (2 * s * b * h - 2 * s * b * h // t), rank


def _regathering_modules(layouts: list[dict]) -> list[list[list[bool]]]:
    """Per layout, per block: whether its mixer and its MLP keep their input's shard (not checkpointed, wrapped)."""
    out = []
    for parallel in layouts:
        cfg = tiny_config("transformer", {"tp": 2, **parallel})
        model = parallelize(build_model(cfg.model), cfg, ParallelDims.from_config(cfg, 2).build_mesh("cpu"),
                            device=torch.device("cpu")).parts[0]
        out.append([[m.__dict__.get("_call_impl") is not None and not is_checkpointed(m, "_call_impl")
                     for m in (block.mixer, block.mlp)] for block in model.layers.values()])
    return out


def test_checkpointed_modules_are_left_alone():
    """Full recomputation and checkpointed submodules keep only their input (the shard) already; without SP there
    is nothing to gather."""
    on = {"sp_regather": True}
    layouts = [{**on, "recompute": "full", "recompute_every": 2},
               {**on, "recompute": "selective", "recompute_modules": "mlp"},
               {**on, "sequence_parallel": False}, {"sp_regather": False}]
    assert run_distributed(_regathering_modules, 2, layouts)[0] == [
        [[False, False], [True, True], [False, False], [True, True]],
        [[True, False]] * 4,
        [[False, False]] * 4,
        [[False, False]] * 4,
    ]


TRAIN = {"micro_batch": 2}


@pytest.mark.parametrize("parallel", [
    pytest.param({"tp": 2, "pp": 2, "pp_schedule": "zero_bubble"}, id="tp2-pp2-zero-bubble"),
    pytest.param({"tp": 2, "dp": 2}, id="tp2-dp2-fsdp"),
])
def test_composes_with_pipelining_and_fsdp(parallel):
    """Two training steps with and without sp_regather on 4 processes: the same losses and parameters, bitwise."""
    archs = ("transformer",)  # one architecture: the others are checked on one layout above, and this is slow
    on, off = (run_distributed(train_layouts, 4, archs, {**parallel, "sp_regather": flag}, TRAIN, 2)
               for flag in (True, False))
    for rank_on, rank_off in zip(on, off):
        for arch in archs:
            assert rank_on[arch][0] == rank_off[arch][0], arch
            for name, value in rank_on[arch][1].items():
                np.testing.assert_array_equal(value, rank_off[arch][1][name], err_msg=f"{arch} {name}")
