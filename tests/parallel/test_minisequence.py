"""Mini-sequence chunking (MsT) gives the plain path's loss and gradients for all four architectures (uneven
chunks, ignored labels, a chunk without any valid label), also under tp=2 with and without sequence parallelism
(vocab-parallel chunked loss), and its LM-head chunking cuts the loss's peak memory."""

import pytest
import torch

from bench.memory import PeakMemory, arch_bytes_per_token
from parallel.minisequence import apply_minisequence, chunked_loss
from tests.dist import run_distributed
from tests.parallel.layouts import ARCHS, assert_same_training, tiny_config, train_layouts
from tests.parallel.test_recompute import STEPS, TRAIN, loss_and_grads, reference


def assert_close(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for name, grad in a[1].items():
        torch.testing.assert_close(grad, b[1][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_loss_and_grads(arch):
    cfg = tiny_config(arch)
    # 3 chunks of T=16 (6, 6, 4) in the MLPs and of the 32 tokens (11, 11, 10) in the loss
    assert_close(loss_and_grads(cfg, lambda model: apply_minisequence(model, 3)), loss_and_grads(cfg))


def test_tied_head_and_ignored_chunk():
    """A tied LM head gets the embedding's gradient plus the head's; a chunk of only ignored labels adds nothing."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    h = torch.randn(2, 12, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 12))
    labels[0, :9] = -100  # the first of 4 chunks (6 tokens each) is all ignored
    results = []
    for loss_fn in (lambda: torch.nn.functional.cross_entropy(head(h).flatten(0, 1), labels.flatten()),
                    lambda: chunked_loss(head, h, labels, chunks=4)):
        h.grad = head.weight.grad = None
        loss = loss_fn()
        loss.backward()
        results.append((loss.detach(), {"h": h.grad, "w": head.weight.grad}))
    assert_close(results[1], results[0])


def test_lm_head_chunking_cuts_peak_memory():
    """At M chunks the loss's forward + backward peak (logits, softmax, their gradients) falls by at least M/2."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 4096, bias=False)
    h = torch.randn(4, 128, 32, requires_grad=True)
    labels = torch.randint(0, 4096, (4, 128))
    plain = lambda: torch.nn.functional.cross_entropy(head(h).float().flatten(0, 1), labels.flatten())  # noqa: E731
    peaks = {}
    for m, loss_fn in ((1, plain), (8, lambda: chunked_loss(head, h, labels, chunks=8))):
        with PeakMemory() as mem:
            loss_fn().backward()
        peaks[m] = mem.peak
    assert peaks[1] / peaks[8] >= 8 / 2, peaks


@pytest.mark.parametrize("arch", ARCHS)
def test_bench_saved_bytes_per_layer(arch):
    """The bench's per-layer measure: MsT drops the MLP intermediates; full recomputation keeps the block input
    (RWKV-7 also its first-layer values), MsT or not."""
    measure = lambda mode, mst: arch_bytes_per_token(arch, mode, mst=mst, seq=64, dtype=torch.bfloat16)  # noqa: E731
    assert measure("none", 4) < measure("none", 1)
    assert measure("full", 1) == measure("full", 4) == 2 * 64 * (2 if arch == "rwkv7" else 1)


# 3 chunks of the gathered 16-token sequence in the MLPs and of the 32 tokens in the vocab-parallel loss; under
# FSDP the head's weight is looked up per call, gathered over dp and still vocab-sharded over tp
@pytest.mark.parametrize("parallel, archs, world", [
    pytest.param({"tp": 2}, ("transformer", "rwkv7"), 2, id="tp2-sp"),
    pytest.param({"tp": 2, "sequence_parallel": False}, ("transformer", "rwkv7"), 2, id="tp2"),
    pytest.param({"dp": 2, "tp": 2}, ("transformer",), 4, id="dp2-fsdp-tp2-sp"),
])
def test_tensor_parallel(parallel, archs, world):
    results = run_distributed(train_layouts, world, archs, {**parallel, "minisequence_chunks": 3}, TRAIN, STEPS)
    assert_same_training(results, reference(ARCHS), archs)
