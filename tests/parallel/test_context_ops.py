"""Context-parallel kernels equal the single-process ops on the whole sequence (float64, gloo).

Every rank makes the same seeded full inputs, runs the op on the whole sequence (the reference: its output and
the gradients of a random-weighted sum w.r.t. every input), then the CP function on its zigzag shard; the CP
output and input gradients must equal the reference's, split, within 1e-10.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from parallel.context import ContextShard, _document_plan, chain_states, chunk_halo, gla_context, previous_steps, \
    ring_attention, rwkv7_context
from pretrain.models.common import shift_tokens
from pretrain.ops import DocumentMask, causal_attention, forgetting_attention, gla, rwkv7
from tests.dist import run_distributed

TOL = 1e-10
B, T, H = 2, 32, 2

# document starts per row (global step 0 always counts); with T = 32 and cp = 2 the chunks are 8 steps:
# row 0: 3 inside chunk 0, 16 at a chunk boundary that is rank 1's seam, 24 at rank 0's seam, 29 inside;
# row 1: the document 12 … 25 spans chunks 1, 2 and 3 (both ranks).
DOC_STARTS = ((0, 3, 16, 24, 29), (0, 12, 26))


def _starts(T_full: int) -> torch.Tensor:
    starts = torch.zeros(B, T_full, dtype=torch.bool)
    for row, steps in enumerate(DOC_STARTS):
        starts[row, [s for s in steps if s < T_full]] = True
    return starts


def _compare(reference_fn, context_fn, inputs, *, docs: bool, seed: int = 0) -> dict:
    """Max abs differences between the CP function on the shard and the reference on the whole sequence."""
    shard = ContextShard.from_group(dist.group.WORLD)
    full = [x.clone().requires_grad_() for x in inputs]
    starts = _starts(inputs[0].shape[1]) if docs else None
    ref = reference_fn(*full, docs=None if starts is None else DocumentMask(starts))
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=ref.dtype)
    ref_grads = torch.autograd.grad((ref * weight).sum(), full)

    local = [shard.split(x.detach()).requires_grad_() for x in inputs]
    local_docs = None if starts is None else DocumentMask(shard.split(starts))
    out = context_fn(*local, shard=shard, docs=local_docs)
    grads = torch.autograd.grad((out * shard.split(weight)).sum(), local)
    errors = {"output": (out - shard.split(ref)).abs().max().item()}
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        errors[f"grad{i}"] = (g - shard.split(rg)).abs().max().item()
    return errors


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _attention_case(kind: str, docs: bool, T_full: int = T):
    D, Dv = 8, 12
    q, k, v = _randn(B, T_full, H, D, seed=1), _randn(B, T_full, H, D, seed=2), _randn(B, T_full, H, Dv, seed=3)
    if kind == "softmax":
        def reference(q, k, v, *, docs):
            return causal_attention(q, k, v, impl="unfused", docs=docs)

        def context(q, k, v, *, shard, docs):
            return ring_attention(q, k, v, shard=shard, docs=docs, block_q=3)  # tiles that do not divide Tc
        return _compare(reference, context, (q, k, v), docs=docs)
    # "fox" mild forgetting, "fox-strong" log f ≈ −4 per step
    shift = -4.0 if kind == "fox-strong" else 2.0
    log_f = F.logsigmoid(_randn(B, T_full, H, seed=4) * 2 + shift)

    def reference(q, k, v, log_f, *, docs):
        return forgetting_attention(q, k, v, log_f, impl="torch", docs=docs)

    def context(q, k, v, log_f, *, shard, docs):
        return ring_attention(q, k, v, shard=shard, docs=docs, log_f=log_f)
    return _compare(reference, context, (q, k, v, log_f), docs=docs)


def _gla_case(docs: bool, T_full: int = T):
    K, V = 8, 12  # K ≠ V: catches a transposed state
    q, k, v = _randn(B, T_full, H, K, seed=5), _randn(B, T_full, H, K, seed=6), _randn(B, T_full, H, V, seed=7)
    g = F.logsigmoid(_randn(B, T_full, H, K, seed=8)) / 4

    def reference(q, k, v, g, *, docs):
        return gla(q, k, v, g, impl="torch", docs=docs)

    def context(q, k, v, g, *, shard, docs):
        return gla_context(q, k, v, g, shard=shard, docs=docs, impl="torch")
    return _compare(reference, context, (q, k, v, g), docs=docs)


def _rwkv7_inputs(T_full: int, K: int = 8, V: int = 8):
    r, k, v = _randn(B, T_full, H, K, seed=9), _randn(B, T_full, H, K, seed=10), _randn(B, T_full, H, V, seed=11)
    w = -0.6 * torch.sigmoid(_randn(B, T_full, H, K, seed=12))  # log decay, RWKV-7's range
    kappa = F.normalize(_randn(B, T_full, H, K, seed=13), dim=-1)
    alpha = torch.sigmoid(_randn(B, T_full, H, K, seed=14))
    return r, w, k, v, -kappa, kappa * alpha  # a = −κ̂, b = κ̂ ⊙ α as in the layer


def _rwkv7_case(docs: bool, T_full: int = T):
    def reference(r, w, k, v, a, b, *, docs):
        return rwkv7(r, w, k, v, a, b, impl="torch", docs=docs)

    def context(r, w, k, v, a, b, *, shard, docs):
        return rwkv7_context(r, w, k, v, a, b, shard=shard, docs=docs, impl="torch")
    return _compare(reference, context, _rwkv7_inputs(T_full), docs=docs)


def _shift_case(docs: bool):
    x = _randn(B, T, 3, 5, seed=15)  # any trailing shape

    def reference(x, *, docs):
        return shift_tokens(x)

    def context(x, *, shard, docs):
        return previous_steps(x, shard=shard)
    return _compare(reference, context, (x,), docs=False)


CASES = {
    "softmax": lambda docs: _attention_case("softmax", docs),
    "fox": lambda docs: _attention_case("fox", docs),
    "fox-strong": lambda docs: _attention_case("fox-strong", docs),
    "gla": _gla_case,
    "rwkv7": _rwkv7_case,
    "shift": _shift_case,  # no documents: the caller multiplies by its own "continues" mask
}


def _run_cases(names, docs_options):
    return {f"{name}{'-docs' if docs else ''}": CASES[name](docs) for name in names for docs in docs_options
            if name != "shift" or not docs}


def _low_precision():
    """fp32 and bf16 inputs: computed in fp32 (or the op's precision), returned in the input dtype, close to fp64."""
    shard = ContextShard.from_group(dist.group.WORLD)
    starts = _starts(T)
    local_docs = DocumentMask(shard.split(starts))
    q, k, v = (shard.split(_randn(B, T, H, 8, seed=s)) for s in (1, 2, 3))
    log_f = shard.split(F.logsigmoid(_randn(B, T, H, seed=4) + 2))
    g = shard.split(F.logsigmoid(_randn(B, T, H, 8, seed=8)) / 4)
    rwkv = [shard.split(x) for x in _rwkv7_inputs(T)]
    calls = {
        "softmax": lambda dt: ring_attention(q.to(dt), k.to(dt), v.to(dt), shard=shard, docs=local_docs),
        "fox": lambda dt: ring_attention(q.to(dt), k.to(dt), v.to(dt), log_f=log_f.to(dt), shard=shard,
                                         docs=local_docs),
        "gla": lambda dt: gla_context(q.to(dt), k.to(dt), v.to(dt), g.to(dt), shard=shard, docs=local_docs,
                                      impl="torch"),
        "rwkv7": lambda dt: rwkv7_context(*(x.to(dt) for x in rwkv), shard=shard, docs=local_docs, impl="torch"),
    }
    errors = {}
    for name, call in calls.items():
        exact = call(torch.float64)
        for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
            out = call(dt)
            assert out.dtype == dt, f"{name}: {dt} inputs gave {out.dtype}"
            errors[f"{name} {dt}"] = err = (out.double() - exact).abs().max().item()
            assert err < tol, f"{name}: {dt} inputs differ from float64 by {err:.3g}"
    return errors


def _assert_close(results):
    for rank, per_case in enumerate(results):
        for case, errors in per_case.items():
            for what, err in errors.items():
                assert err < TOL, f"rank {rank} {case} {what}: max |CP − reference| = {err:.3g}"


@pytest.mark.parametrize("names", [("softmax", "fox", "fox-strong"), ("gla", "rwkv7", "shift")],
                         ids=["ring", "state"])
def test_cp2_equals_one_process(names):
    _assert_close(run_distributed(_run_cases, 2, names, (False, True)))


def test_low_precision_inputs():
    run_distributed(_low_precision, 2)


def test_cp1_is_the_op():
    """A cp group of one: no ring steps, the chain over its own two chunks."""
    _assert_close(run_distributed(_run_cases, 1, tuple(CASES), (False, True)))


@pytest.mark.slow
def test_cp4_equals_one_process():
    _assert_close(run_distributed(_run_cases, 4, ("softmax", "fox", "gla", "rwkv7", "shift"),
                                  (False, True)))


def _shard_round_trip():
    shard = ContextShard.from_group(dist.group.WORLD)
    N, r = shard.size, shard.rank
    x = torch.arange(2 * 16 * 3).view(2, 16, 3)  # (B, T, C): T = 16 is divisible by 2N for N = 2, 4
    local = shard.split(x)
    Tc = 16 // (2 * N)
    positions = shard.positions(16, "cpu")
    assert shard.chunks == (r, 2 * N - 1 - r)
    assert torch.equal(positions, torch.cat((torch.arange(r * Tc, (r + 1) * Tc),
                                             torch.arange((2 * N - 1 - r) * Tc, (2 * N - r) * Tc))))
    assert torch.equal(local, x[:, positions])
    assert torch.equal(shard.gather(local), x)
    assert torch.equal(shard.gather(shard.split(x.transpose(0, 1), dim=0), dim=0), x.transpose(0, 1))
    for bad in (x[:, :15], x[:, :2 * N + 1]):
        with pytest.raises(ValueError, match=rf"T = {bad.shape[1]}.*N = {N}.*2N = {2 * N}"):
            shard.split(bad)
    with pytest.raises(ValueError, match=r"divisible by 2N"):
        shard.positions(15, "cpu")
    return True


def _document_plan_and_dtensor_halo():
    shard = ContextShard.from_group(dist.group.WORLD)
    # the document plan: global ids equal the whole row's, and chunk pairs no row can see are skipped
    starts = _starts(T)
    docs = DocumentMask(shard.split(starts))
    plan = _document_plan(docs, shard)
    assert _document_plan(docs, shard) is plan  # one all-gather per mask, not per layer
    assert torch.equal(plan.ids, shard.split(DocumentMask(starts).doc_ids))
    # with 8-step chunks: row 0's documents 3…15, 16…23, 24…28, 29…31; row 1's 0…11, 12…25, 26…31
    assert plan.visible == ((True, False, False, False), (True, True, False, False), (False, True, True, False),
                            (False, True, True, True))
    # previous_steps on a tensor-parallel DTensor (a cp × tp mesh, tp of size 1 here): same values, same spec
    mesh = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("cp", "tp"))
    x = _randn(B, T, 4, seed=16)
    local = shard.split(x)
    plain = local.clone().requires_grad_()
    expected = previous_steps(plain, shard=shard)
    weight = torch.randn(expected.shape, dtype=expected.dtype)
    (expected * weight).sum().backward()
    for placement in (Replicate(), Shard(2)):
        leaf = local.clone().requires_grad_()
        x_dt = DTensor.from_local(leaf, mesh["tp"], [placement], run_check=False)
        out = previous_steps(x_dt, shard=ContextShard.from_group(mesh["cp"].get_group()))
        assert isinstance(out, DTensor) and out.placements == (placement,) and out.shape == x_dt.shape
        assert torch.equal(out.to_local(), expected.detach())
        (out.to_local() * weight).sum().backward()
        assert torch.equal(leaf.grad, plain.grad)
    with pytest.raises(ValueError, match="sharded on dims 0 or 1"):
        previous_steps(DTensor.from_local(local, mesh["tp"], [Shard(1)], run_check=False), shard=shard)
    return True


def _pieces_of_a_halo():
    """A mini-sequence piece's previous steps, from its whole's halo (one all-gather for all pieces), equal the
    whole's previous steps cut to the piece: pieces inside a chunk, across the chunk boundary and at its start."""
    shard = ContextShard.from_group(dist.group.WORLD)
    whole = shard.split(_randn(B, T, 3, seed=17))  # (B, T_loc, 3)
    expected = previous_steps(whole, shard=shard)
    halo = chunk_halo(whole, shard=shard)  # (2, B, 3)
    Tc = whole.shape[1] // 2
    for start, stop in ((0, 5), (4, Tc + 3), (Tc - 1, Tc + 1), (Tc, Tc + 4), (Tc + 2, 2 * Tc)):
        piece = previous_steps(whole[:, start:stop], shard=shard, piece=(whole, halo, start))
        assert torch.equal(piece, expected[:, start:stop]), (start, stop)
    return True


def test_mini_sequence_pieces_shift_from_the_halo():
    assert all(run_distributed(_pieces_of_a_halo, 2))


def test_shard_split_gather_positions():
    assert all(run_distributed(_shard_round_trip, 2))


def test_document_plan_and_dtensor_halo():
    assert all(run_distributed(_document_plan_and_dtensor_halo, 2))


def test_shard_errors_without_processes():
    shard = ContextShard(group=None, rank=1, size=3)
    assert shard.chunks == (1, 4)
    assert torch.equal(shard.positions(12, "cpu"), torch.tensor([2, 3, 8, 9]))
    with pytest.raises(ValueError, match=r"T = 16 .*N = 3.*2N = 6"):
        shard.split(torch.zeros(1, 16))


def _sequential_rwkv7_states(r, w, k, v, a, b, bounds):
    """Step-by-step fp64 recurrence of DESIGN.md; the state entering each step in bounds."""
    S = torch.zeros(r.shape[0], r.shape[2], r.shape[3], v.shape[3], dtype=torch.float64)  # (B, H, K, V)
    entering = []
    for t in range(r.shape[1]):
        if t in bounds:
            entering.append(S.clone())
        aS = torch.einsum("bhk,bhkv->bhv", a[:, t], S)
        S = w[:, t].exp()[..., None] * S + b[:, t][..., None] * aS[..., None, :] \
            + k[:, t][..., None] * v[:, t][..., None, :]
    return torch.stack(entering)


@pytest.mark.parametrize("K, V", [(8, 8), (4, 12)])
def test_chain_matches_a_sequential_recurrence(K, V):
    """The chained merge over chunks, fed each chunk's (S_loc, M) from the op run with [v | 0] and initial state
    [0 | I], gives the sequential recurrence's states at the chunk boundaries: checks M's orientation too."""
    T_full, n_chunks = 32, 4
    Tc = T_full // n_chunks
    r, w, k, v, a, b = _rwkv7_inputs(T_full, K, V)
    # a stronger low-rank term than the layer's (b ⊙ a up to 4 per channel), so a transposed M would show
    b = b * 4
    rows = [x.unflatten(1, (n_chunks, Tc)).transpose(0, 1).flatten(0, 1) for x in (r, w, k, v, a, b)]  # (n·B, Tc, H, ·)
    v_ext = torch.cat((rows[3], torch.zeros(*rows[3].shape[:3], K, dtype=torch.float64)), -1)
    h0 = torch.cat((torch.zeros(K, V, dtype=torch.float64), torch.eye(K, dtype=torch.float64)), -1)
    _, final = rwkv7(rows[0], rows[1], rows[2], v_ext, rows[4], rows[5], impl="torch", output_final_state=True,
                     initial_state=h0.expand(n_chunks * B, H, K, V + K))
    final = final.unflatten(0, (n_chunks, B))  # (n, B, H, K, V+K)
    chained = chain_states(final[..., :V], final[..., V:], diagonal=False)
    expected = _sequential_rwkv7_states(r, w, k, v, a, b, {c * Tc for c in range(n_chunks)})
    assert (chained - expected).abs().max() < TOL
    # and GLA's diagonal transition: b = 0 reduces RWKV-7 to GLA (scale 1, o from S_t)
    zero = torch.zeros_like(b)
    expected_gla = _sequential_rwkv7_states(r, w, k, v, zero, zero, {c * Tc for c in range(n_chunks)})
    _, final = gla(rows[0], rows[2], torch.cat((rows[3], torch.zeros(*rows[3].shape[:3], 1, dtype=torch.float64)),
                                                -1), rows[1], impl="torch", output_final_state=True,
                   initial_state=torch.cat((torch.zeros(K, V, dtype=torch.float64),
                                            torch.ones(K, 1, dtype=torch.float64)), -1).expand(n_chunks * B, H, K,
                                                                                             V + 1))
    final = final.unflatten(0, (n_chunks, B))
    chained = chain_states(final[..., :V], final[..., V], diagonal=True)
    assert (chained - expected_gla).abs().max() < TOL
