"""Tensor (and sequence) parallelism: `apply_tp(model, mesh, plan)` lays a model out by a plan from `plans.py`.

Conventions inside a tensor-parallel model (Megatron's, expressed with DTensor):
- The residual stream between blocks is a DTensor: `Shard(1)` (sequence shards) with sequence parallelism,
  else `Replicate()`. Norms, dropout and residual adds run on it as they are.
- A mixer or MLP gets the whole sequence as a `Replicate()` DTensor: under SP an all-gather, whose backward is
  one reduce-scatter of the summed gradients; without SP its gradient is all-reduced on the way back
  (`AllReduceInputGradient`, Megatron's f). Whatever acts on that input before the column-parallel
  projections (RWKV-7's token shift and μ mixing, LoRA down-projections) is DTensor arithmetic on replicated
  parameters.
- Column-parallel projections hand the mixer plain local tensors holding its heads; per-head parameters are
  `Shard(0)` DTensors that the module sees as local tensors (`HeadSharded`). Row-parallel output projections
  return the residual layout (a reduce-scatter under SP, else an all-reduce).
- The LM head is column-parallel over the vocabulary and the loss never gathers the logits
  (`vocab_parallel_cross_entropy`).
"""

from __future__ import annotations

from fnmatch import fnmatch
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from pretrain.models.common import IGNORE_INDEX, at_least_fp32


class ReplicatedParams(ParallelStyle):
    """The module's own parameters (all, or those named) as `Replicate()` DTensors.

    For weights applied to a replicated activation ahead of column-parallel projections. Each rank
    back-propagates only its heads through them, so their gradients come out `Partial` (a sum over the TP
    ranks); FSDP reduces them with the rest, otherwise `reduce_partial_grads` does.

    With `local_views=True` the module sees them as local tensors during its forward (as `HeadSharded` does), for
    parameters applied to the local heads' activations (GLA's output-norm scale, shared by all heads): their local
    gradients are marked `Partial` too.
    """

    def __init__(self, *names: str, local_views: bool = False):
        super().__init__()
        self.names = names
        self.local_views = local_views

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        replicated = []
        for name, param in list(module.named_parameters(recurse=False)):
            if not self.names or name in self.names:
                dtensor = distribute_tensor(param.data, device_mesh, [Replicate()], src_data_rank=self.src_data_rank)
                module.register_parameter(name, nn.Parameter(dtensor, requires_grad=param.requires_grad))
                replicated.append(name)
        if self.local_views:
            module.register_forward_pre_hook(partial(_put_local_views, replicated, grad_placements=(Partial(),)))
            module.register_forward_hook(partial(_drop_local_views, replicated))
        return module


class HeadSharded(ParallelStyle):
    """1-D per-channel parameters of size H·D (per-head norms, RWKV-7's k_k, k_a, r_k) sharded with their heads.

    They live as `Shard(0)` DTensors (so state-dict keys stay and checkpoints reshard) and the module sees them
    as local tensors during its forward: a pre-hook puts `param.to_local()` in the module's `__dict__`, which
    attribute lookup prefers to `_parameters`, and a post-hook removes it. Gradients flow through `to_local`.
    """

    def __init__(self, *names: str):
        super().__init__()
        self.names = names

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name in self.names:
            param = module._parameters[name]
            dtensor = distribute_tensor(param.data, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(dtensor, requires_grad=param.requires_grad))
        module.register_forward_pre_hook(partial(_put_local_views, self.names))
        module.register_forward_hook(partial(_drop_local_views, self.names))
        return module


class VocabParallelEmbedding(ParallelStyle):
    """An `nn.Embedding` with its rows (the vocabulary) split over the ranks, as Megatron's: each rank looks up
    the tokens in its rows (zeros for the others) and the partial sums leave reduced to `output_layout` (a
    reduce-scatter to sequence shards, or an all-reduce). Its backward touches only the rank's own rows, where
    DTensor's row-wise embedding computes the whole table's gradient on every rank.
    """

    def __init__(self, *, output_layout):
        super().__init__()
        self.output_layout = output_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        vocab = module.weight.shape[0]
        dtensor = distribute_tensor(module.weight.data, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
        module.register_parameter("weight", nn.Parameter(dtensor))
        start = vocab_shard_start(vocab, device_mesh.size(), device_mesh.get_local_rank())
        rows = dtensor.to_local().shape[0]
        outside = {}  # the current tokens outside this rank's rows, from the pre-hook to the post-hook

        def local_lookup(module, args):
            tokens = args[0]  # (B, T) token ids
            outside["mask"] = (tokens < start) | (tokens >= start + rows)
            module.__dict__["weight"] = module._parameters["weight"].to_local()  # (rows, d)
            return ((tokens - start).masked_fill(outside["mask"], 0),)

        def reduce(module, args, output):  # output (B, T, d): this rank's rows' share
            del module.__dict__["weight"]
            partial = output.masked_fill(outside.pop("mask").unsqueeze(-1), 0.0)
            return DTensor.from_local(partial, device_mesh, [Partial()]).redistribute(placements=[self.output_layout])

        module.register_forward_pre_hook(local_lookup)
        module.register_forward_hook(reduce)
        return module


class ReplicatedDocumentMask(ParallelStyle):
    """Under document masking, the module's token shift multiplies its replicated DTensor input by the mask's
    `continues` (RWKV-7's time and channel mixes zero the previous token at a document start): the module gets a
    copy of the `docs` mask whose `continues` is a `Replicate()` DTensor, which it is (every tensor-parallel rank holds
    the same batch), so forward and backward stay DTensor arithmetic. The ops inside keep the plain forms.

    It wraps `forward`, so a mini-sequence chunking applied later (which wraps `forward` again and cuts `docs` into
    pieces) hands each piece's mask through it."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        forward = module.forward

        def forward_with_replicated_mask(*args, docs=None, **kwargs):
            if docs is not None:
                docs = docs.with_continues(DTensor.from_local(docs.continues, device_mesh, [Replicate()],
                                                              run_check=False))
            return forward(*args, docs=docs, **kwargs)

        module.forward = forward_with_replicated_mask
        return module


class AllReduceInputGradient(ParallelStyle):
    """Megatron's `f` without sequence parallelism: the module's first input (a `Replicate()` DTensor) passes as
    it is, and its gradient, each rank's heads' partial sum, is all-reduced on the way back. The residual
    stream's gradient so stays `Replicate()`, and the norms' backward needs no communication of its own."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_forward_pre_hook(_all_reduce_gradient_of_input)
        return module


def _all_reduce_gradient_of_input(module, args):
    x = args[0]
    # from_local's backward redistributes the gradient to Replicate: an all-reduce; nothing happens forward
    return (DTensor.from_local(x.to_local(), x.device_mesh, x.placements, run_check=False), *args[1:])


def _put_local_views(names, module, args, *, grad_placements=None) -> None:
    for name in names:
        module.__dict__[name] = module._parameters[name].to_local(grad_placements=grad_placements)


def _drop_local_views(names, module, args, output) -> None:
    for name in names:
        module.__dict__.pop(name, None)


def matching_modules(model: nn.Module, pattern: str) -> list[str]:
    """Names of `model`'s submodules matching `pattern`, where `*` stands for one whole name component."""
    parts = pattern.split(".")
    return [name for name, _ in model.named_modules()
            if len(name.split(".")) == len(parts) and all(fnmatch(a, b) for a, b in zip(name.split("."), parts))]


def apply_tp(model: nn.Module, mesh: DeviceMesh, plan: dict[str, tuple[ParallelStyle, ...]]) -> None:
    """Lay `model` out over the 1-D tensor-parallel `mesh` by `plan` (module-name patterns → styles), in place.

    The weights are either on the meta device (nothing is allocated or sent: `parallelize` materialises the shards
    afterwards) or the same full weights on every rank (each style keeps its shard of them). Afterwards each
    parameter is a DTensor, a tied LM head is tied again, and `model.loss` is the vocab-parallel one.
    """
    for pattern, styles in plan.items():
        for name in matching_modules(model, pattern):
            for style in styles:
                parallelize_module(model.get_submodule(name), mesh, style)
    if model.cfg.tie_embeddings and model.lm_head is not None:
        model.lm_head.weight = model.tok_emb.weight  # both are Shard(0) over the vocabulary
    if model.lm_head is not None:
        model.loss = partial(vocab_parallel_loss, model.lm_head)
    plain = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise RuntimeError(f"the tensor-parallel plan places no layout on {', '.join(plain)}; "
                           f"add them to the architecture's plan in parallel/plans.py")


def vocab_parallel_loss(lm_head: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100 from a vocab-sharded LM head; the full logits never exist."""
    logits = lm_head(h)  # DTensor (B, T, V) sharded on V
    mesh = logits.device_mesh
    local = at_least_fp32(logits.to_local())  # (B, T, V_local): this rank's vocabulary slice
    start = vocab_shard_start(logits.shape[-1], mesh.size(), mesh.get_local_rank())
    return vocab_parallel_cross_entropy(local.flatten(0, 1), labels.flatten(), vocab_start=start,
                                        group=mesh.get_group())


def vocab_shard_start(vocab: int, world: int, rank: int) -> int:
    """First vocabulary row of `rank`'s `Shard(0)` slice: DTensor splits as torch.chunk does (ceil(V / n) rows
    per rank, fewer on the last ones)."""
    return min(rank * -(-vocab // world), vocab)


# Cross-entropy over logits (n, V_local) split along the vocabulary, each rank holding rows [vocab_start, vocab_start
# + V_local): three all-reduces of (n,) vectors (max, sum of exponentials, target logit) instead of gathering (n, V).
# In three parts, so that the mini-sequence loss (parallel/minisequence.py), which recomputes each chunk's logits in
# backward, runs the same arithmetic as `vocab_parallel_cross_entropy`.


def vocab_parallel_softmax_parts(logits: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The max-shifted local logits (n, V_local) and Σ exp over the whole vocabulary (n,): two all-reduces of (n,)."""
    logits_max = logits.max(dim=-1).values  # (n,)
    dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - logits_max.unsqueeze(-1)  # (n, V_local)
    sum_exp = shifted.exp().sum(dim=-1)  # (n,)
    dist.all_reduce(sum_exp, group=group)
    return shifted, sum_exp


def _label_rows(labels: torch.Tensor, vocab_start: int, n_local: int):
    """Each label's row in this rank's slice (n, 1; clamped where the label is elsewhere), whether it is this rank's
    (n,), and whether the label counts (n,). An ignored label is negative, so it is never this rank's."""
    local = labels - vocab_start
    mine = (local >= 0) & (local < n_local)
    return local.clamp(0, n_local - 1).unsqueeze(-1), mine, labels != IGNORE_INDEX


def vocab_parallel_loss_sum(shifted: torch.Tensor, sum_exp: torch.Tensor, labels: torch.Tensor, *, vocab_start: int,
                            group: dist.ProcessGroup) -> torch.Tensor:
    """Σ cross-entropy over the labels (n,) that count, from `vocab_parallel_softmax_parts`: one all-reduce of (n,)
    gives every rank the target logit, which only the rank holding its row has."""
    index, mine, valid = _label_rows(labels, vocab_start, shifted.shape[-1])
    target = torch.where(mine, shifted.gather(-1, index).squeeze(-1), 0.0)  # (n,)
    dist.all_reduce(target, group=group)
    return torch.where(valid, sum_exp.log() - target, 0.0).sum()


def vocab_parallel_logits_grad(shifted: torch.Tensor, sum_exp: torch.Tensor, labels: torch.Tensor, *,
                               vocab_start: int, scale: torch.Tensor) -> torch.Tensor:
    """d (scale · `vocab_parallel_loss_sum`) / d local logits: (softmax − one_hot(label)) · scale on the rows whose
    label counts, 0 on the others; no communication. A new tensor: the saved parts stay as they are, as a zero-bubble
    schedule may run the backward again with retain_graph."""
    index, mine, valid = _label_rows(labels, vocab_start, shifted.shape[-1])
    grad = (shifted.exp() / sum_exp.unsqueeze(-1)).scatter_add_(-1, index, -mine.to(shifted.dtype).unsqueeze(-1))
    return grad.mul_((valid.to(grad.dtype) * scale).unsqueeze(-1))  # (n, V_local)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group):  # logits (N, V_local) fp32 or fp64, labels (N,)
        shifted, sum_exp = vocab_parallel_softmax_parts(logits, group)
        total = vocab_parallel_loss_sum(shifted, sum_exp, labels, vocab_start=vocab_start, group=group)
        count = (labels != IGNORE_INDEX).sum()
        ctx.vocab_start = vocab_start
        ctx.save_for_backward(shifted, sum_exp, labels, count)
        return total / count  # 0 / 0 = nan without valid labels, as F.cross_entropy gives

    @staticmethod
    def backward(ctx, grad_loss):
        shifted, sum_exp, labels, count = ctx.saved_tensors
        # no labels: a zero gradient, not 0/0 (under cp the global mean sends grad_loss = 0 to such a rank)
        grad = vocab_parallel_logits_grad(shifted, sum_exp, labels, vocab_start=ctx.vocab_start,
                                          scale=grad_loss / count.clamp(min=1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, vocab_start: int,
                                 group: dist.ProcessGroup) -> torch.Tensor:
    """Mean cross-entropy over labels != -100 of logits (N, V_local) holding vocabulary rows
    [vocab_start, vocab_start + V_local) on each rank of `group`; equals F.cross_entropy on the gathered logits."""
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_start, group)


@torch.no_grad()
def reduce_partial_grads(params) -> None:
    """Sum `Partial` gradients (of `ReplicatedParams`) over their ranks; FSDP does this itself when it reduces."""
    for p in params:
        grad = p.grad
        if isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements):
            p.grad = grad.redistribute(grad.device_mesh, p.placements)



# Autograd nodes of ops whose output shares its input's storage: a tensor saved through a chain of them from a
# dtype cast of the gathered input is a view of that cast copy.
_VIEW_NODES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0",
                         "TBackward0", "TransposeBackward0", "PermuteBackward0", "ExpandBackward0",
                         "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "AsStridedBackward0"})


def _local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding `t`'s data on this process (a DTensor's shard, a finished collective's result)."""
    t = t._local_tensor if isinstance(t, DTensor) else t
    return t.elem if isinstance(t, funcol.AsyncCollectiveTensor) else t


class _SavedFromGathered:
    """A saved view of the gathered input (or of a dtype cast of it), packed as how to make it again."""

    __slots__ = ("dtype", "size", "stride", "offset", "spec")

    def __init__(self, t: torch.Tensor, dtype: torch.dtype):
        local = _local(t)
        self.dtype = dtype
        self.size, self.stride, self.offset = local.shape, local.stride(), local.storage_offset()
        self.spec = (t.device_mesh, t.placements, t.shape, t.stride()) if isinstance(t, DTensor) else None

    def rebuild(self, whole: torch.Tensor, *, base_offset: int) -> torch.Tensor:
        """This view of `whole` (the re-gathered local input, laid out as the forward's one at `base_offset`)."""
        if self.dtype == whole.dtype:
            offset = whole.storage_offset() + self.offset - base_offset
        else:  # a cast copy is a fresh tensor: offsets of its views count from its start
            whole, offset = whole.to(self.dtype), self.offset
        local = torch.empty(0, dtype=self.dtype, device=whole.device).set_(whole.untyped_storage(), offset,
                                                                           self.size, self.stride)
        if self.spec is None:
            return local
        mesh, placements, shape, stride = self.spec
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


class _RegatherCall:
    """One call of a module under `keep_input_shard`: its saved-tensor hooks. Tensors saved from the gathered input
    are packed as its shard, which the first unpack of a backward pass gathers again and the pass's last drops;
    everything else goes to the hooks outside (a benchmark's, a checkpoint's), if any."""

    def __init__(self, shard: DTensor):
        self.shard = shard.detach()
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(True)  # (pack, unpack) or None
        self.gathered = None  # (mesh, placements, storage pointer, dtype, stride, offset, nbytes)
        self.gathered_node = None  # its autograd node, to recognise casts of it during the forward
        self.packed_shard = None  # the shard as the outer hooks packed it, once anything was saved from it
        self.saves = self.unpacks_left = 0
        self.whole = None  # the re-gathered local input, during one backward pass

    def capture(self, gathered: DTensor) -> None:
        local = _local(gathered)
        self.gathered = (gathered.device_mesh, gathered.placements, local.untyped_storage().data_ptr(), local.dtype,
                         local.stride(), local.storage_offset(), local.untyped_storage().nbytes())
        self.gathered_node = gathered.grad_fn

    def end_forward(self) -> None:
        """Keep nothing for backward unless something was saved from the gathered input."""
        self.shard = self.gathered_node = None

    def _dtype_if_from_gathered(self, t: torch.Tensor) -> torch.dtype | None:
        """`t`'s dtype if it is a view of the gathered input or of a whole dtype cast of it (autocast's copy for a
        linear), else None."""
        if self.gathered is None:  # saved before the all-gather
            return None
        _, _, pointer, dtype, _, _, nbytes = self.gathered
        node = self.gathered_node
        local = _local(t)
        if local.untyped_storage().data_ptr() == pointer:
            return local.dtype
        cast = t.grad_fn
        while cast is not None and cast.name() in _VIEW_NODES:
            cast = cast.next_functions[0][0]
        if node is None or cast is None or cast.name() != "ToCopyBackward0" or cast.next_functions[0][0] is not node:
            return None
        whole_copy = local.untyped_storage().nbytes() * dtype.itemsize == nbytes * local.dtype.itemsize
        return local.dtype if whole_copy else None

    def pack(self, t: torch.Tensor):
        dtype = self._dtype_if_from_gathered(t)
        if dtype is None:
            return self.outer[0](t) if self.outer else t
        if self.packed_shard is None:
            self.packed_shard = self.outer[0](self.shard) if self.outer else self.shard
        self.saves += 1
        self.unpacks_left += 1
        return _SavedFromGathered(t, dtype)

    def unpack(self, packed) -> torch.Tensor:
        if not isinstance(packed, _SavedFromGathered):
            return self.outer[1](packed) if self.outer else packed
        mesh, placements, _, _, stride, offset, _ = self.gathered
        if self.whole is None:
            shard = self.outer[1](self.packed_shard) if self.outer else self.packed_shard
            with torch.no_grad():
                self.whole = _local(shard.redistribute(mesh, placements))  # the forward's all-gather, again
            if self.whole.stride() != stride:
                raise RuntimeError("sp_regather: the input gathered again is laid out unlike the forward's")
        whole = self.whole
        self.unpacks_left -= 1
        if self.unpacks_left == 0:  # the pass's last use; another pass (zero-bubble's weight pass) gathers again
            self.whole, self.unpacks_left = None, self.saves
        return packed.rebuild(whole, base_offset=offset)


def keep_input_shard(module: nn.Module) -> None:
    """Make `module` (a mixer or an MLP whose first input the plan all-gathers over the sequence in a forward
    pre-hook) keep that input's sequence shard for backward instead of the gathered whole, and gather it again there.

    Megatron's trade: 2sbh/t bytes kept instead of 2sbh, for one more all-gather per module in backward. Applied
    after tensor parallelism (its pre-hook runs after the plan's) and never to a checkpointed module: a checkpoint
    keeps only its input, the shard, already, and these hooks would hide its own. Every forward and backward op
    stays as it was, so losses and gradients are bitwise the same.
    """
    call = module._call_impl
    calls: list[_RegatherCall] = []  # the call in progress

    def regathering_call(*args, **kwargs):
        x = args[0] if args else None
        if not (torch.is_grad_enabled() and isinstance(x, DTensor) and any(p.is_shard() for p in x.placements)):
            return call(*args, **kwargs)
        calls.append(_RegatherCall(x))
        try:
            with torch.autograd.graph.saved_tensors_hooks(calls[-1].pack, calls[-1].unpack):
                return call(*args, **kwargs)
        finally:
            calls.pop().end_forward()

    def capture_gathered(mod, args) -> None:  # after the plan's pre-hook: args[0] is the gathered input
        if calls and calls[-1].gathered is None and isinstance(args[0], DTensor):
            calls[-1].capture(args[0])

    module.register_forward_pre_hook(capture_gathered)
    module._call_impl = regathering_call
