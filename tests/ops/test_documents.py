"""Document masking in the ops (`docs=`): a packed row of documents gives what running each document alone gives.

For every op, rows A|B|C whose boundaries fall inside and on the torch paths' chunks (32) and sub-chunks (8) equal
the documents run one by one (outputs, final states and every input gradient, initial state / past included),
in float64 to 1e-10 and in float32 to 1e-4 (max |error| relative to max(1, max |reference|)); per document the
fla naive references (and SDPA for softmax attention) are the external oracle; the same rows without `docs`
differ; and the `DocumentMask` forms the backends use are checked against loops over its rows.
"""

import pytest
import torch
import torch.nn.functional as F

from pretrain.ops import DocumentMask, causal_attention, forgetting_attention, gla, rwkv7
from pretrain.ops.documents import check_docs
from pretrain.ops.forgetting import _tiles
from tests.ops.helpers import assert_matches, assert_near, log_gates, qkv

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

T = 80
# Document starts per row (B = 2). "crossing": row 0 is A|B|C = 13|40|27 and its first piece continues the
# given state / past; row 1 starts with a document (the state / past is cut) and its boundaries cross chunks.
# "aligned": row 0 has no start at all; row 1's starts sit on sub-chunk and chunk edges, with one-step documents.
LAYOUTS = {"crossing": ((13, 53), (0, 29, 61)), "aligned": ((), (0, 8, 32, 33, 79))}


def gates(gen, shape, dtype, strong):
    """Log decays / forget gates: mild ones (≈ −0.05 a step, so what a missing mask lets through is visible), or
    the shared test gates with very strong decays mixed in (finite results where cumulative decays underflow)."""
    if strong:
        return log_gates(gen, shape, dtype)
    return F.logsigmoid(3 + torch.randn(*shape, generator=gen, dtype=dtype))


def document_mask(layout: str) -> DocumentMask:
    rows = LAYOUTS[layout]
    starts = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        starts[b, list(row)] = True
    return DocumentMask(starts)


def pieces(row_starts):
    """(start, stop, cut) of each document piece of a row; cut: the piece begins with a document start."""
    bounds = sorted({0, *row_starts, T})
    return [(a, e, a in row_starts) for a, e in zip(bounds[:-1], bounds[1:])]


def by_documents(call, inputs, layout, state=None):
    """Run call(piece inputs, state or None) → (o, final state or None) on every piece of every row alone, the
    row's state (sliced with [b:b+1]; a tuple for a past) going to its first piece unless that piece is cut.
    Returns the outputs reassembled to (B, T, ...) and each row's last final state stacked (B, ...)."""
    outs, finals = [], []
    for b, row_starts in enumerate(LAYOUTS[layout]):
        row_out = []
        for a, e, cut in pieces(row_starts):
            given = None if state is None or cut or a else _rows(state, b)
            o, final = call([x[b:b + 1, a:e] for x in inputs], given)
            row_out.append(o)
        outs.append(torch.cat(row_out, 1))
        finals.append(final)
    return torch.cat(outs, 0), (None if finals[0] is None else torch.cat(finals, 0))


def _rows(state, b):
    return tuple(x[b:b + 1] for x in state) if isinstance(state, tuple) else state[b:b + 1]


def assert_mask_has_effect(o_docs, o_plain):
    assert (o_docs - o_plain).abs().max() > 1e-3, "the same rows without docs give the same output"


# --- the DocumentMask forms -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_document_mask_forms_match_loops(layout):
    docs = document_mask(layout)
    B = len(LAYOUTS[layout])
    expected_bounds, first, last = [], [], []
    for b, row_starts in enumerate(LAYOUTS[layout]):
        first.append(len(expected_bounds))
        expected_bounds += [b * T + a for a, _, _ in pieces(row_starts)]
        last.append(len(expected_bounds) - 1)
    assert docs.cu_seqlens.tolist() == expected_bounds + [B * T]
    assert docs.first_piece.tolist() == first and docs.last_piece.tolist() == last

    states = torch.randn(B, 3, 2)
    on_pieces = docs.to_pieces(states)
    for n in range(on_pieces.shape[0]):
        row = [b for b in range(B) if first[b] <= n <= last[b]][0]
        keep = n == first[row] and 0 not in LAYOUTS[layout][row]
        assert torch.equal(on_pieces[n], states[row] if keep else torch.zeros(3, 2)), f"piece {n}"
    assert torch.equal(docs.to_rows(on_pieces + 1), on_pieces[last] + 1)

    mask = docs.attention_mask
    for b, row_starts in enumerate(LAYOUTS[layout]):
        doc = [sum(s <= t for s in row_starts) for t in range(T)]
        expected = torch.tensor([[s <= t and doc[s] == doc[t] for s in range(T)] for t in range(T)])
        assert torch.equal(mask[b, 0], expected)
    bias = docs.attention_bias(torch.float64)
    assert torch.equal(bias, torch.zeros(bias.shape, dtype=torch.float64).masked_fill(~mask, float("-inf")))
    assert docs.attention_bias(torch.float64) is bias, "one additive mask per dtype, shared by every layer"


def test_flex_block_mask_is_document_causal():
    """The block mask the CUDA paths use (causal_attention, FoX "flex"), run by unfused flex on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    docs = document_mask("crossing")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (x.transpose(1, 2) for x in qkv(gen, 2, T, 2, 16, 16, torch.float64))  # (B, H, T, D)
    o = flex_attention(q, k, v, block_mask=docs.flex_block_mask())
    o_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=docs.attention_mask)
    assert_near(o, o_sdpa, 1e-12, "flex with the document block mask")
    assert docs.flex_block_mask() is docs.flex_block_mask(), "one block mask per DocumentMask"


def test_check_docs_rejects_a_mismatched_mask():
    docs = document_mask("crossing")
    with pytest.raises(ValueError, match="slice"):
        check_docs(docs, torch.zeros(2, T - 1, 2, 4), "op")
    with pytest.raises(TypeError, match="DocumentMask"):
        check_docs(docs.starts, torch.zeros(2, T, 2, 4), "op")


# --- causal softmax attention ---------------------------------------------------------------------------------

def attention_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [x.requires_grad_() for x in qkv(gen, 2, T, 2, 16, 8, dtype)]


@pytest.mark.parametrize("impl", ["sdpa", "unfused"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_packed_equals_documents_alone(layout, impl):
    inputs = attention_inputs(torch.float64)
    docs = document_mask(layout)
    o = causal_attention(*inputs, 0.3, impl=impl, docs=docs)
    # per document: PyTorch SDPA with its own causal mask is the oracle
    reference, _ = by_documents(lambda xs, _: (causal_attention(*xs, 0.3), None), inputs, layout)
    assert_matches([o], [reference], inputs, ("q", "k", "v"), 1e-10)
    assert_mask_has_effect(o, causal_attention(*inputs, 0.3, impl=impl))


@pytest.mark.parametrize("impl", ["sdpa", "unfused"])
def test_attention_with_dropout_stays_in_documents(impl):
    """With dropout (SDPA with the mask on every device) a document's outputs ignore other documents: changing
    row 0's first document leaves the rest as they were, under the same dropout draws."""
    q, k, v = (x.detach() for x in attention_inputs(torch.float32))
    docs = document_mask("crossing")
    outs = []
    for shift in (0.0, 5.0):
        k2, v2 = k.clone(), v.clone()
        k2[0, :13] += shift
        v2[0, :13] += shift
        torch.manual_seed(1)
        outs.append(causal_attention(q, k2, v2, dropout_p=0.3, impl=impl, docs=docs))
    assert torch.equal(outs[0][0, 13:], outs[1][0, 13:]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0, :13], outs[1][0, :13])


# --- forgetting attention -------------------------------------------------------------------------------------

def fox_inputs(dtype, seed=0, T0=0, strong=False):
    """q, k, v, log_f over T steps and a past (k0, v0, log_f0) of T0 steps."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(gen, 2, T, 2, 16, 8, dtype)
    log_f = gates(gen, (2, T, 2), dtype, strong)
    _, k0, v0 = qkv(gen, 2, T0, 2, 16, 8, dtype)
    log_f0 = gates(gen, (2, T0, 2), dtype, strong)
    return [x.requires_grad_() for x in (q, k, v, log_f)], tuple(x.requires_grad_() for x in (k0, v0, log_f0))


FOX_CASES = [  # (dtype, tolerance, layout, tile sizes, strong gates): tiles smaller than documents skip some
    (torch.float64, 1e-10, "crossing", {"block_q": 16, "block_k": 8}, False),
    (torch.float64, 1e-10, "aligned", {"block_q": 8, "block_k": 16}, False),
    (torch.float64, 1e-10, "crossing", {}, False),
    (torch.float64, 1e-10, "aligned", {"block_q": 16, "block_k": 16}, True),
    (torch.float32, 1e-4, "crossing", {"block_q": 16, "block_k": 8}, False),
]


@pytest.mark.parametrize("dtype,tol,layout,blocks,strong", FOX_CASES)
def test_forgetting_packed_with_past_equals_documents_alone(dtype, tol, layout, blocks, strong):
    inputs, past = fox_inputs(dtype, T0=11, strong=strong)
    docs = document_mask(layout)
    o = forgetting_attention(*inputs, past=past, docs=docs, **blocks)

    def alone(xs, given):
        return forgetting_attention(*xs, past=given, **blocks), None

    reference, _ = by_documents(alone, inputs, layout, state=past)
    assert_matches([o], [reference], [*inputs, *past], ("q", "k", "v", "log_f", "k0", "v0", "log_f0"), tol)
    assert_mask_has_effect(o, forgetting_attention(*inputs, past=past, **blocks))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forgetting_matches_fla_naive_per_document(layout):
    from fla.ops.forgetting_attn.naive import naive_forgetting_attn

    inputs, _ = fox_inputs(torch.float32, seed=1)
    o = forgetting_attention(*inputs, docs=document_mask(layout), block_q=16, block_k=16)
    reference, _ = by_documents(lambda xs, _: (naive_forgetting_attn(*xs), None), inputs, layout)
    assert_matches([o], [reference], inputs, ("q", "k", "v", "log_f"), 1e-4)


def test_forgetting_skips_tiles_between_documents():
    """Key tiles wholly before every row's query document are left out; tiles inside one document per row
    need no document mask."""
    starts = torch.zeros(2, 64, dtype=torch.bool)
    starts[:, 32] = True
    doc = DocumentMask(starts).doc_ids
    plan = {(i0, j0): mixes for i0, _, tiles in _tiles(64, 64, 16, 16, q_doc=doc, k_doc=doc) for j0, _, _, mixes in tiles}
    assert (32, 0) not in plan and (48, 16) not in plan  # document 2's queries never meet document 1's keys
    assert plan[(32, 32)] is False and plan[(16, 0)] is False  # one document per tile: no document mask
    starts[1, 40] = True  # now row 1's query block 48… has a document start inside key tile 32…
    doc = DocumentMask(starts).doc_ids
    plan = {(i0, j0): mixes for i0, _, tiles in _tiles(64, 64, 16, 16, q_doc=doc, k_doc=doc) for j0, _, _, mixes in tiles}
    assert plan[(48, 32)] is True


def test_forgetting_flex_forward_matches_torch_path():
    inputs, past = fox_inputs(torch.float32, seed=2, T0=11)
    inputs, past = [x.detach() for x in inputs], tuple(x.detach() for x in past)
    docs = document_mask("crossing")
    for given in (None, past):
        o = forgetting_attention(*inputs, past=given, docs=docs, impl="torch")
        # flex sums the gate in float32 over the whole row, hence the looser bound
        assert_near(forgetting_attention(*inputs, past=given, docs=docs, impl="flex"), o, 1e-4, "flex")


# --- GLA ------------------------------------------------------------------------------------------------------

def gla_inputs(dtype, seed=0, strong=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(gen, 2, T, 2, 16, 8, dtype)
    g = gates(gen, (2, T, 2, 16), dtype, strong)
    h0 = torch.randn(2, 2, 16, 8, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, g, h0)]


STATE_CASES = [  # (dtype, tolerance, layout, chunk size, strong decays)
    (torch.float64, 1e-10, "crossing", 32, False), (torch.float64, 1e-10, "aligned", 32, False),
    (torch.float64, 1e-10, "crossing", 16, False), (torch.float64, 1e-10, "aligned", 32, True),
    (torch.float32, 1e-4, "crossing", 32, False)]


@pytest.mark.parametrize("dtype,tol,layout,chunk_size,strong", STATE_CASES)
def test_gla_packed_with_state_equals_documents_alone(dtype, tol, layout, chunk_size, strong):
    *inputs, h0 = gla_inputs(dtype, strong=strong)
    docs = document_mask(layout)
    o, ht = gla(*inputs, 0.3, initial_state=h0, output_final_state=True, chunk_size=chunk_size, docs=docs)

    def alone(xs, given):
        return gla(*xs, 0.3, initial_state=given, output_final_state=True, chunk_size=chunk_size)

    reference = by_documents(alone, inputs, layout, state=h0)
    assert_matches((o, ht), reference, [*inputs, h0], ("q", "k", "v", "g", "h0"), tol)
    assert_mask_has_effect(o, gla(*inputs, 0.3, initial_state=h0, chunk_size=chunk_size))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gla_matches_fla_naive_per_document(layout):
    from fla.ops.gla.naive import naive_recurrent_gla

    *inputs, h0 = gla_inputs(torch.float32, seed=1)
    o, ht = gla(*inputs, initial_state=h0, output_final_state=True, docs=document_mask(layout))

    def alone(xs, given):
        return naive_recurrent_gla(*xs, initial_state=given, output_final_state=True)

    reference = by_documents(alone, inputs, layout, state=h0)
    assert_matches((o, ht), reference, [*inputs, h0], ("q", "k", "v", "g", "h0"), 1e-4)


def test_gla_without_starts_equals_no_docs():
    """A mask without any start takes the masked code path and must change nothing."""
    *inputs, h0 = gla_inputs(torch.float64, seed=2)
    docs = DocumentMask(torch.zeros(2, T, dtype=torch.bool))
    o, ht = gla(*inputs, initial_state=h0, output_final_state=True, docs=docs)
    reference = gla(*inputs, initial_state=h0, output_final_state=True)
    assert_matches((o, ht), reference, [*inputs, h0], ("q", "k", "v", "g", "h0"), 1e-12)


# --- RWKV-7 ---------------------------------------------------------------------------------------------------

def rwkv7_inputs(dtype, seed=0, strong=False):
    gen = torch.Generator().manual_seed(seed)
    r, k, v = qkv(gen, 2, T, 2, 16, 8, dtype)
    w = gates(gen, (2, T, 2, 16), dtype, strong)
    kappa = F.normalize(torch.randn(2, T, 2, 16, generator=gen, dtype=dtype), dim=-1)
    a, b = -kappa, kappa * torch.rand(2, T, 2, 16, generator=gen, dtype=dtype)
    h0 = torch.randn(2, 2, 16, 8, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (r, w, k, v, a, b, h0)]


RWKV_NAMES = ("r", "w", "k", "v", "a", "b", "h0")


@pytest.mark.parametrize("dtype,tol,layout,chunk_size,strong", STATE_CASES)
def test_rwkv7_packed_with_state_equals_documents_alone(dtype, tol, layout, chunk_size, strong):
    *inputs, h0 = rwkv7_inputs(dtype, strong=strong)
    docs = document_mask(layout)
    o, ht = rwkv7(*inputs, initial_state=h0, output_final_state=True, chunk_size=chunk_size, docs=docs)

    def alone(xs, given):
        return rwkv7(*xs, initial_state=given, output_final_state=True, chunk_size=chunk_size)

    reference = by_documents(alone, inputs, layout, state=h0)
    assert_matches((o, ht), reference, [*inputs, h0], RWKV_NAMES, tol)
    assert_mask_has_effect(o, rwkv7(*inputs, initial_state=h0, chunk_size=chunk_size))


def test_rwkv7_start_cuts_the_low_rank_term_too():
    """With no decay at all (w = 0) only the b (aᵀ S) term could carry the previous document across a start."""
    r, w, k, v, a, b, h0 = (x.detach() for x in rwkv7_inputs(torch.float64, seed=3))
    w = torch.zeros_like(w)
    docs = document_mask("crossing")
    o = rwkv7(r, w, k, v, a, b, initial_state=h0, docs=docs)
    reference, _ = by_documents(lambda xs, given: rwkv7(*xs, initial_state=given, output_final_state=True),
                                [r, w, k, v, a, b], "crossing", state=h0)
    assert_near(o, reference, 1e-10, "o")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rwkv7_matches_fla_dplr_recurrence_per_document(layout):
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    *inputs, h0 = rwkv7_inputs(torch.float32, seed=1)
    o, ht = rwkv7(*inputs, initial_state=h0, output_final_state=True, docs=document_mask(layout))

    def alone(xs, given):
        r, w, k, v, a, b = (x.transpose(1, 2) for x in xs)  # fla's head-first layout
        o, state = dplr_recurrence(r * r.shape[-1] ** 0.5, k, v, a, b, w, initial_state=given)  # RWKV-7: scale 1
        return o.transpose(1, 2), state

    reference = by_documents(alone, inputs, layout, state=h0)
    assert_matches((o, ht), reference, [*inputs, h0], RWKV_NAMES, 1e-4)


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["attention", "forgetting", "gla", "rwkv7"])
def test_ops_reject_a_mask_of_another_shape(op):
    docs = document_mask("crossing").slice(0, T - 8)
    with pytest.raises(ValueError, match="docs covers"):
        if op == "attention":
            causal_attention(*attention_inputs(torch.float32), docs=docs)
        elif op == "forgetting":
            forgetting_attention(*fox_inputs(torch.float32)[0], docs=docs)
        elif op == "gla":
            gla(*gla_inputs(torch.float32)[:4], docs=docs)
        else:
            rwkv7(*rwkv7_inputs(torch.float32)[:6], docs=docs)


# --- GPU backends (fla's varlen kernels, compiled FlexAttention) -----------------------------------------------

GPU_CASES = [("attention", "sdpa"), ("forgetting", "fla"), ("forgetting", "flex"), ("gla", "fla"), ("rwkv7", "fla")]


def gpu_call(op, impl, inputs, docs):
    """The op on inputs (o, then the final state for the recurrent ops) with the given backend."""
    if op == "attention":  # "sdpa" with docs on CUDA and no dropout is the FlexAttention path
        return [causal_attention(*inputs, impl=impl, docs=docs)]
    if op == "forgetting":
        return [forgetting_attention(*inputs, impl=impl, docs=docs)]
    if op == "gla":
        return list(gla(*inputs[:4], initial_state=inputs[4], output_final_state=True, impl=impl, docs=docs))
    return list(rwkv7(*inputs[:6], initial_state=inputs[6], output_final_state=True, impl=impl, docs=docs))


@pytest.mark.gpu
@pytest.mark.parametrize("op,impl", GPU_CASES)
def test_gpu_backend_with_docs_matches_torch_path_bf16(op, impl):
    from tests.ops.helpers import assert_grads_rel, rel_err

    if impl == "fla":
        pytest.importorskip("fla")
    T_gpu = 300
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(gen, 2, T_gpu, 4, 64, 64, torch.float32)
    if op == "attention":
        inputs = [q, k, v]
    elif op == "forgetting":
        inputs = [q, k, v, F.logsigmoid(torch.randn(2, T_gpu, 4, generator=gen) + 2)]
    elif op == "gla":
        inputs = [q, k, v, F.logsigmoid(torch.randn(2, T_gpu, 4, 64, generator=gen)) / 16,
                  torch.randn(2, 4, 64, 64, generator=gen)]
    else:
        kappa = F.normalize(torch.randn(2, T_gpu, 4, 64, generator=gen), dim=-1)
        inputs = [q, -0.6065 * torch.sigmoid(torch.randn(2, T_gpu, 4, 64, generator=gen)), k, v, -kappa,
                  kappa * torch.rand(2, T_gpu, 4, 64, generator=gen), torch.randn(2, 4, 64, 64, generator=gen)]
    inputs = [x.cuda() for x in inputs]
    starts = torch.zeros(2, T_gpu, dtype=torch.bool)
    starts[0, [45, 170, 171]] = True  # row 0 continues its state; row 1 cuts it at t = 0
    starts[1, [0, 64, 250]] = True
    docs = DocumentMask(starts.cuda())
    reference_impl = "unfused" if op == "attention" else "torch"
    ref_in = [x.clone().requires_grad_() for x in inputs]
    references = gpu_call(op, reference_impl, ref_in, docs)
    # bf16 activations (GLA's and RWKV-7's decays too, as their existing GPU tests run them); FoX's gate and
    # the initial states stay float32
    n_low = {"attention": 3, "forgetting": 3, "gla": 4, "rwkv7": 6}[op]
    low = [x.bfloat16().requires_grad_() if i < n_low else x.clone().requires_grad_() for i, x in enumerate(inputs)]
    outs = gpu_call(op, impl, low, docs)
    for a, b in zip(outs, references):
        assert rel_err(a, b) <= 2e-2
    cotangents = [torch.randn_like(references[0])] + [None] * (len(references) - 1)
    assert_grads_rel(outs, low, references, ref_in, [f"input {i}" for i in range(len(low))], cotangents)
