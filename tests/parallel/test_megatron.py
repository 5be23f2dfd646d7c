"""Our tensor-parallel layers equal megatron-core's on the same weights (2 gloo ranks, no sequence parallelism,
which megatron-core cannot run without CUDA): the MLP's column → row pair, the vocab-parallel embedding and the
vocab-parallel cross-entropy; outputs and gradients."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.dist import run_distributed

pytest.importorskip("megatron.core")

D, VOCAB, B, T = 32, 64, 2, 8  # megatron-core needs the vocabulary divisible by tp


def _compare_with_megatron():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                               vocab_parallel_cross_entropy as megatron_ce)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    from parallel.plans import tp_plan
    from parallel.tensor import apply_tp, vocab_parallel_cross_entropy
    from pretrain.config import build_config
    from pretrain.models import build_model

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank, mesh = dist.get_rank(), init_device_mesh("cpu", (2,))
    torch.manual_seed(0)  # the same model and data on both ranks
    cfg = build_config({"model": {"d_model": D, "n_layers": 1, "n_heads": 4, "vocab_size": VOCAB, "seq_len": T,
                                  "mlp": "gelu", "mlp_ratio": 4.0, "bias": True}}).model
    model = build_model(cfg)
    mlp, emb = model.layers["0"].mlp, model.tok_emb
    with torch.no_grad():
        mlp.up_proj.bias.normal_()
        mlp.down_proj.bias.normal_()
    w_up, w_down, w_emb = (m.weight.detach().clone() for m in (mlp.up_proj, mlp.down_proj, emb))
    b_up, b_down = mlp.up_proj.bias.detach().clone(), mlp.down_proj.bias.detach().clone()
    apply_tp(model, mesh, tp_plan(cfg, sequence_parallel=False))
    x = torch.randn(B, T, D)
    tokens = torch.randint(0, VOCAB, (B, T))
    logits = torch.randn(B * T, VOCAB)
    labels = torch.randint(0, VOCAB, (B * T,))
    out = {}

    # MLP: ours (column → row over DTensors) against ColumnParallelLinear → RowParallelLinear
    x_ours = x.clone().requires_grad_()
    y = mlp(DTensor.from_local(x_ours, mesh, [Replicate()])).full_tensor()
    y.square().sum().backward()
    mcfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
    col = ColumnParallelLinear(D, w_up.shape[0], config=mcfg, init_method=torch.nn.init.zeros_, bias=True,
                               gather_output=False)
    row = RowParallelLinear(w_up.shape[0], D, config=mcfg, init_method=torch.nn.init.zeros_, bias=True,
                            input_is_parallel=True, skip_bias_add=False)
    with torch.no_grad():
        col.weight.copy_(w_up.chunk(2, 0)[rank])
        col.bias.copy_(b_up.chunk(2, 0)[rank])
        row.weight.copy_(w_down.chunk(2, 1)[rank])
        row.bias.copy_(b_down)
    x_meg = x.clone().requires_grad_()
    y_meg = row(F.gelu(col(x_meg)[0]))[0]
    y_meg.square().sum().backward()
    out["mlp output"] = (y, y_meg)
    out["mlp input grad"] = (x_ours.grad, x_meg.grad)
    out["up_proj grad"] = (mlp.up_proj.weight.grad.to_local(), col.weight.grad)
    out["up_proj bias grad"] = (mlp.up_proj.bias.grad.to_local(), col.bias.grad)
    out["down_proj grad"] = (mlp.down_proj.weight.grad.to_local(), row.weight.grad)

    # vocab-parallel embedding (our residual without SP is Replicate; its gradient arrives Partial)
    h = emb(tokens)
    h.full_tensor().square().sum().backward()
    meg_emb = VocabParallelEmbedding(VOCAB, D, init_method=torch.nn.init.zeros_, config=mcfg)
    with torch.no_grad():
        meg_emb.weight.copy_(w_emb.chunk(2, 0)[rank])
    h_meg = meg_emb(tokens)
    h_meg.square().sum().backward()
    out["embedding output"] = (h.full_tensor(), h_meg)
    out["embedding grad"] = (emb.weight.grad.to_local(), meg_emb.weight.grad)

    # cross-entropy over a vocabulary split in two
    local = logits.chunk(2, -1)[rank]
    ours_in, meg_in = local.clone().requires_grad_(), local.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(ours_in, labels, vocab_start=rank * VOCAB // 2, group=mesh.get_group())
    loss.backward()
    meg_loss = megatron_ce(meg_in.view(B * T, 1, -1), labels.view(B * T, 1)).mean()  # per token → mean
    meg_loss.backward()
    out["cross-entropy"] = (loss, meg_loss)
    out["cross-entropy grad"] = (ours_in.grad, meg_in.grad)
    out["cross-entropy vs torch"] = (loss, F.cross_entropy(logits, labels))
    parallel_state.destroy_model_parallel()
    return {k: (a.detach().numpy(), b.detach().numpy()) for k, (a, b) in out.items()}


def test_tp_layers_match_megatron_core():
    for rank, result in enumerate(run_distributed(_compare_with_megatron, 2)):
        for name, (ours, megatron) in result.items():
            np.testing.assert_allclose(ours, megatron, rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}: {name}")
