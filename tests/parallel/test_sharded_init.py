"""Sharded initialisation: under every layout each process allocates only its shards, and together they hold exactly
the weights one process initialises from the same seed (RWKV-7's layer- and channel-dependent init and the
orthogonal matrices included).

Starting processes is most of the cost here, so every 2-way layout runs on one pair of processes and dp2·tp2 on one
set of four (module-scoped fixtures); the tests then check what they returned.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist

from bench.startup import model_bytes, start_up
from parallel.mesh import ParallelDims
from pretrain.models import REGISTRY, build_model
from pretrain.models.common import orthogonal_weight
from tests.dist import run_distributed
from tests.parallel.layouts import ARCHS, build, full_params, tiny_config

# (architecture, model fields changed from the tiny config): the four, plus tied embeddings (one weight under two
# names) and the gpt preset's fields (biases, LayerNorm, GeLU MLP, learned positions)
VARIANTS = [(arch, {}) for arch in ARCHS] + [("gla", {"tie_embeddings": True}), ("transformer", {"preset_gpt": True})]
GPT_FIELDS = {"norm": "layernorm", "mlp": "gelu", "mlp_ratio": 4.0, "bias": True, "pos": "learned",
              "attn_impl": "unfused", "pro": False}
LAYOUTS = {  # name → (processes, parallel section, variants)
    "dp2-fsdp": (2, {"dp": 2}, VARIANTS),
    "dp2-ddp": (2, {"dp": 2, "data_parallel": "ddp"}, [("rwkv7", {})]),
    "tp2-sp": (2, {"tp": 2}, VARIANTS),
    "pp2-interleaved": (2, {"pp": 2, "pp_schedule": "interleaved_1f1b"}, VARIANTS[:4]),  # no tied weights under pp
    "dp2-tp2": (4, {"dp": 2, "tp": 2}, [("transformer", {}), ("rwkv7", {})]),
}

# Big enough that one module (the largest here: RWKV-7's channel mix, with its orthogonal init's temporaries) is a
# few percent of the model; a whole model per process, or a deep copy of one for pipeline stages, is ≥ 1.0 of it.
PEAK_MODEL = {"d_model": 128, "n_layers": 16, "n_heads": 2, "vocab_size": 256, "seq_len": 16}
PEAK_CASES = [("transformer", "dp2-fsdp"), ("rwkv7", "tp2-sp"), ("rwkv7", "pp2-interleaved")]
PEAK_LIMIT = 0.75  # half the model, plus one module and its temporaries


def config(arch: str, parallel: dict, fields: dict):
    cfg = tiny_config(arch, parallel)
    if fields.get("preset_gpt"):
        fields = GPT_FIELDS
    cfg.model = dataclasses.replace(cfg.model, **fields)
    return cfg


def one_process_weights(cfg) -> dict[str, np.ndarray]:
    """The reference: the whole model built on meta, materialised and initialised on one process."""
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = build_model(cfg.model)
    model.to_empty(device="cpu")
    if cfg.model.tie_embeddings:  # to_empty from meta gives the head a weight of its own
        model.lm_head.weight = model.tok_emb.weight
    model.init_weights()
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def initial_weights(layouts: list[str]) -> dict[str, list[tuple[dict | None, dict]]]:
    """On every rank, per layout and variant: the one-process reference (rank 0 only) and the full weights this
    rank holds."""
    out = {}
    for layout in layouts:
        _, parallel, variants = LAYOUTS[layout]
        out[layout] = []
        for arch, fields in variants:
            cfg = config(arch, parallel, fields)
            mesh = ParallelDims.from_config(cfg, dist.get_world_size()).build_mesh("cpu")
            model, _ = build(cfg, mesh)
            out[layout].append((one_process_weights(cfg) if dist.get_rank() == 0 else None, full_params(model)))
    return out


def two_way_run() -> tuple[dict, list[dict]]:
    """On each of two ranks: the initial weights of every 2-way layout, then the start-up peaks of PEAK_CASES."""
    weights = initial_weights([name for name, (world, _, _) in LAYOUTS.items() if world == 2])
    return weights, [start_up(LAYOUTS[layout][1], {"arch": arch, **PEAK_MODEL}) for arch, layout in PEAK_CASES]


@pytest.fixture(scope="module")
def two_way():
    return run_distributed(two_way_run, 2)


@pytest.fixture(scope="module")
def four_way():
    return run_distributed(initial_weights, 4, ["dp2-tp2"])


def assert_weights_equal(ranks: list[dict], layout: str) -> None:
    for i, (arch, fields) in enumerate(LAYOUTS[layout][2]):
        reference = ranks[0][layout][i][0]
        held = {name: value for rank in ranks for name, value in rank[layout][i][1].items()}  # stages: the union
        assert held.keys() == reference.keys(), (layout, arch, fields, held.keys() ^ reference.keys())
        for name, value in reference.items():
            # bitwise: each shard is a copy of the full tensor one process draws
            np.testing.assert_array_equal(held[name], value, err_msg=f"{layout} {arch} {fields} {name}")


@pytest.mark.parametrize("layout", [name for name, (world, _, _) in LAYOUTS.items() if world == 2])
def test_initial_weights_equal_one_process(two_way, layout):
    assert_weights_equal([weights for weights, _ in two_way], layout)


def test_initial_weights_equal_one_process_dp2_tp2(four_way):
    assert_weights_equal(four_way, "dp2-tp2")


def test_start_up_never_holds_the_whole_model(two_way):
    """Peak bytes allocated on each rank from building the model to its first step (the CPU allocator's count,
    as bench/startup.py measures it) stay well below the full model's parameter bytes."""
    for i, (arch, layout) in enumerate(PEAK_CASES):
        total = model_bytes({"arch": arch, **PEAK_MODEL})
        for _, peaks in two_way:
            assert peaks[i]["peak_bytes"] <= PEAK_LIMIT * total, (arch, layout, peaks[i], total)


@pytest.mark.parametrize("arch", ["gla", "rwkv7"])
def test_one_process_keeps_tied_embeddings(arch):
    cfg = config(arch, {}, {"tie_embeddings": True})
    model = build(cfg, None)[0].parts[0]
    assert model.lm_head.weight is model.tok_emb.weight
    reference = one_process_weights(cfg)
    assert reference.keys() == dict(model.named_parameters()).keys()
    for name, param in model.named_parameters():
        np.testing.assert_array_equal(param.detach().numpy(), reference[name], err_msg=name)


# hybrids are built of these architectures' blocks (tests/parallel/test_hybrid_layouts.py initialises them sharded)
@pytest.mark.parametrize("arch, fields", [(arch, {}) for arch in REGISTRY if arch != "hybrid"] + VARIANTS[4:])
def test_init_steps_write_every_parameter_once_whole(arch, fields):
    """What sharded initialisation relies on: each step writes all of its submodule's own parameters (a copy holding
    only them, NaN before the step, has none left), and the steps together reach every parameter."""
    cfg = config(arch, {}, fields)
    with torch.device("meta"):
        model = build_model(cfg.model)
    written = set()
    for name, init in model.init_steps():
        module = model.get_submodule(name).to_empty(device="cpu", recurse=False)
        with torch.no_grad():  # as every runner of the steps
            for param in module.parameters(recurse=False):
                param.fill_(float("nan"))
            init(module)
        for param_name, param in module.named_parameters(prefix=name, recurse=False):
            assert not param.isnan().any(), (arch, name, param_name)
            written.add(param_name)
        module.to_empty(device="meta", recurse=False)
    assert written == {name for name, _ in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
def test_orthogonal_weight_is_torch_orthogonal_init(shape):
    ours, theirs = torch.nn.Linear(shape[1], shape[0]), torch.nn.Linear(shape[1], shape[0])
    orthogonal_weight(ours, gain=0.7, generator=torch.Generator().manual_seed(1))
    torch.nn.init.orthogonal_(theirs.weight, gain=0.7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.weight, theirs.weight)
