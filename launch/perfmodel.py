"""Performance model: PREDICTED step time, throughput and memory of a layout on N GPUs, and layout suggestions.

    python -m launch.perfmodel --cluster configs/clusters/h100-nvlink-ib.toml --config configs/X.toml \
        [--model.key=value ...] --gpus 1024 --seq-len 4096 --global-batch 1024 [--results results.jsonl] [--json]
    python -m launch.perfmodel --fit-gloo          # measure α, β of gloo all-reduce on this machine (2 processes)

Everything this module prints or returns is a PREDICTION from the inputs below, never a measurement; `validate()`
sets predictions next to measured sweep rows so the two can be told apart and compared.

Inputs
  * FLOPs per token: `pretrain.metrics.flops_per_token` (6·N + the mixer's term, softmax counted over the full
    s×s square), plus the forward FLOPs that recomputation repeats (full: every block's forward, 1/3 of its
    training FLOPs; selective: the core-attention term's forward, or for GLA / RWKV-7 the whole mixer's).
  * Per-device compute rate: a measured single-device throughput (tokens/s of a dp = tp = pp = 1 run, see
    `calibrate()`), turned into achieved FLOP/s; otherwise `peak_flops × efficiency` from the cluster TOML.
  * Communication volumes: the analytic terms of `bench/comm.py` (which checks them against the bytes the
    collectives really move), in functions shared with it: `tp_volume`, `dp_volume`, `pp_volume`.
  * Links: α-β model per cluster (`Cluster`, from `configs/clusters/*.toml`). Ring collectives over g ranks:
        all-reduce       2(g−1)/g · n/β + 2(g−1)·α        (n = payload bytes)
        all-gather / reduce-scatter  (g−1)/g · n/β + (g−1)·α   (n = the gathered / scattered-from size)
        send             n/β + α
    The TP group uses the intra-node link when tp ≤ gpus_per_node; the DP and PP groups use the inter-node link
    when they span nodes (mesh order (pp, dp_replicate, dp_shard, cp, tp), tp innermost, ranks packed node by node):
    FSDP's gathers and reduce-scatters run over dp_shard, HSDP's all-reduce over dp_replicate.
  * Pipeline bubble: (p−1)/(v·m) of the pipelined work for 1F1B (v = 1) and interleaved 1F1B (v virtual stages,
    m micro-batches per step); zero_bubble is ASSUMED to leave 1/3 of that, (p−1)/(3·v·m), as ZB-H1 does in Qi et
    al. 2023 ("Zero Bubble Pipeline Parallelism") — torch's interleaved zero-bubble schedule splits the weight
    gradient the same way but its exact bubble depends on the timing of B and W passes.

Step time = compute + TP comm + PP comm + CP comm + bubble + (1 − dp_overlap)·DP comm. TP and PP communication are
taken as exposed (on the critical path); DP communication overlaps backward by the cluster's `dp_overlap` (0 =
conservative).

Context parallelism (parallel.cp, `cp_time`, `cp_volume`): compute splits evenly over the cp ranks (zigzag
balance), plus state passing's K identity value columns (`cp_extra_flops_per_token`); ring attention's hops overlap
the tile loop and only their excess over it is exposed; state passing's all-gather, FoX's totals, the token-shift
halos and the loss's all-reduce are exposed (α-dominated), the state chain adds 2·cp small kernels. Activations
per rank are those of seq_len / cp steps (plus `ring_extra_bytes_per_layer`), the logits too; FSDP shards and
reduces over dp × cp. cp is suggested when sequences are long (`MIN_CP_LOCAL_STEPS` per rank at least): where
no layout without it fits in memory, the suggestions are cp layouts.

Memory per GPU (the first pipeline stage, which holds most activations):
  * weights, gradients and AdamW states: 4 + 4 + 8 = 16 bytes per parameter (fp32 master weights, fp32
    gradients, two fp32 moments), the stage's parameters split over tp and, under FSDP, over dp_shard (= dp
    without HSDP) — except the gradients when FSDP accumulates them unsharded over m > 1 micro-steps
    (parallel.fsdp_reduce_every_micro_step = false, and always under pp > 1, where torch's pipeline schedules
    accumulate a stage's micro-batches unsharded): 4 bytes per parameter of the stage. FSDP adds the gathered
    compute-dtype copies (two units in flight when resharding after forward, the whole stage when not) and DDP
    under bf16 autocast the cast copies of the weights.
  * activations per block from Korthikanti et al. 2022 (DESIGN §5), generalised by counting saved tensors:
    none sbh(34 + 5as/h), TP sbh(10 + 24/t + 5as/(ht)), TP+SP sbh(34/t + 5as/(ht)), selective drops the 5as/h
    term, full keeps the block input 2sbh (÷t under SP), for the gpt preset (GeLU 4h, dropout, unfused attention)
    exactly. Other blocks: SwiGLU keeps 4 tensors of width f (gate, up, SiLU(gate), product), GeLU and RWKV-7's
    squared-ReLU feed-forward 2; no dropout, no dropout masks; fused attention kernels (SDPA, flex, fla) keep
    no s² scores. Linear mixers are modelled by the tensors their layer keeps (documented at
    `_mixer_elements`) plus fla's chunk-boundary states (s/C)·H·K·V in fp32 (doubled for RWKV-7's
    diagonal-plus-low-rank transition); selective recomputation keeps only their input.
    Blocks in flight: 1F1B holds min(m, p) micro-batches of the stage's L/p blocks; interleaved and zero-bubble
    hold min(m·v, (v−1)·p + 2(p−1) + 1) chunks of L/(p·v) blocks (the interleaved warm-up on the first rank).
    The last stage adds the logits: s·b·V/t/minisequence_chunks elements in the compute dtype plus fp32.
    A hybrid (model.arch='hybrid') counts each block as the block of its layer's mixer (`activation_bytes_by_layer`)
    and takes their mean per block in flight; its FLOPs are `flops_per_token`'s per-layer terms, and selective
    recomputation repeats each layer's own mixer term.
  * plus the cluster's `reserved_bytes` (CUDA context, NCCL buffers, allocator slack).

Not modelled: kernel efficiency changing with micro-batch, width or TP shard size (the single-device rate is
used as is); overlap of TP communication with compute (async TP) and of PP p2p with compute; stage imbalance
from the embedding and LM head; NCCL tree / NVLS / SHARP algorithms (ring α-β only, conservative at scale);
network contention between concurrent groups; stragglers, data loading, checkpointing, optimizer step time;
memory fragmentation beyond `reserved_bytes`; FoX/Transformer "Pro" extras in activations beyond ~5 sbh; under
context parallelism, document masking's extras (int64 document ids travelling with each ring block, the per-forward
plan), load imbalance from documents, and the overlap of FoX's and the halos' small collectives.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import Config, ModelConfig, build_config, layer_config, layer_mixers, load_config

FSDP_PREFETCH_UNITS = 2  # FSDP2 keeps the unit in use and the one prefetched gathered
DDP_BUCKET_BYTES = 25 * 2**20  # DDP's default gradient bucket: one all-reduce per bucket
CHUNK = 64  # chunk length of fla's chunk_gla kernel: its per-chunk states are what a GPU run keeps
SOFTMAX_ARCHS = ("transformer", "fox")


# ----------------------------------------------------------------------------------------------- cluster, layout

@dataclass
class Cluster:
    """A cluster's devices and links, read from `configs/clusters/*.toml`."""

    name: str
    """Label printed with every prediction."""
    gpus_per_node: int
    """Devices per node, joined by the intra-node link."""
    peak_flops: float
    """Dense bf16 peak FLOP/s of one device (the MFU denominator)."""
    memory_bytes: float
    """Device memory in bytes."""
    efficiency: float
    """Achieved / peak FLOP/s assumed when no measured single-device throughput is given."""
    intra_alpha: float
    """Intra-node latency per ring step, seconds."""
    intra_beta: float
    """Intra-node bandwidth per device (ring bus bandwidth), bytes/s."""
    inter_alpha: float
    """Inter-node latency per ring step, seconds."""
    inter_beta: float
    """Inter-node bandwidth per device, bytes/s."""
    dp_overlap: float = 0.0
    """Fraction of data-parallel communication hidden behind compute (0 = none, conservative)."""
    dtype_bytes: int = 2
    """Bytes per activation and gathered-weight element: 2 for bf16 (GPU), 4 for fp32 (CPU)."""
    reserved_bytes: float = 0.0
    """Memory unavailable to the model: runtime context, communication buffers, allocator slack."""

    @classmethod
    def load(cls, path: str | Path) -> Cluster:
        values = tomllib.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(known)}.")
        return cls(**values)

    def link(self, inter_node: bool) -> tuple[float, float]:
        """(α seconds, β bytes/s) of the link a group uses."""
        return (self.inter_alpha, self.inter_beta) if inter_node else (self.intra_alpha, self.intra_beta)


@dataclass(frozen=True)
class Layout:
    """One way to lay a run out on dp · tp · pp devices (the `parallel` and batch settings that matter here)."""

    dp: int = 1
    """Data-parallel degree (dp_replicate × dp_shard)."""
    dp_replicate: int = 1
    """HSDP: replicas of the FSDP shards (all-reduced once per step); 1 = plain FSDP (or DDP) over dp."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    cp: int = 1
    """Context-parallel degree: every sequence split over cp ranks (parallel.cp)."""
    sequence_parallel: bool = True
    """Megatron-style sequence parallelism along tp (no effect at tp = 1)."""
    data_parallel: str = "fsdp"
    """fsdp | ddp."""
    reshard_after_forward: bool = True
    """FSDP: gather the weights again in backward."""
    fsdp_reduce_every_micro_step: bool = True
    """FSDP: reduce-scatter every micro-step (sharded gradients) rather than once per step (unsharded)."""
    pp_schedule: str = "1f1b"
    """1f1b | interleaved_1f1b | zero_bubble."""
    virtual_stages: int = 0
    """Stages per pipeline rank; 0 = 1 for 1f1b, 2 otherwise (as parallel.pipeline resolves it)."""
    recompute: str = "none"
    """none | selective | full."""
    micro_batch: int = 1
    """Sequences per micro-step per data-parallel rank."""
    global_batch: int = 1
    """Sequences per optimizer step over all data-parallel ranks."""
    minisequence_chunks: int = 1
    """MsT chunks of the LM head + loss (divides the logits' memory)."""

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def v(self) -> int:
        """Virtual stages per pipeline rank, resolved."""
        if self.pp == 1:
            return 1
        return self.virtual_stages or (1 if self.pp_schedule == "1f1b" else 2)

    @property
    def dp_shard(self) -> int:
        """Ranks FSDP shards over: dp, or under HSDP dp / dp_replicate."""
        return self.dp // self.dp_replicate

    @property
    def fsdp_shard(self) -> int:
        """Ranks FSDP shards parameters over: dp_shard × cp (the cp ranks of a replica hold distinct shards and
        their gradients are summed over cp too: parallel/mesh.py's dp_shard_cp)."""
        return self.dp_shard * self.cp

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step on one data-parallel rank."""
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def grads_sharded(self) -> bool:
        """FSDP keeps the accumulating gradients sharded: it reduce-scatters every micro-step. Not under a pipeline:
        torch's schedules accumulate a stage's micro-batches unsharded and reduce once."""
        return (self.fsdp_reduce_every_micro_step and self.pp == 1) or self.micro_batches == 1

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def label(self) -> str:
        dp = f"dp{self.dp}" + (f"=r{self.dp_replicate}s{self.dp_shard}" if self.dp_replicate > 1 else "")
        parts = [dp, f"tp{self.tp}" + ("sp" if self.sp else ""), f"pp{self.pp}"]
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.pp > 1:
            parts.append({"1f1b": "1f1b", "interleaved_1f1b": f"i1f1b-v{self.v}", "zero_bubble": f"zb-v{self.v}"}
                         [self.pp_schedule])
        if self.dp * self.cp > 1 and self.data_parallel == "ddp":  # DDP over dp × cp
            parts.append("ddp")
        elif self.dp * self.cp > 1:
            parts.append(("hsdp" if self.dp_replicate > 1 else "fsdp") + ("" if self.reshard_after_forward
                                                                        else "-noreshard")
                         + ("" if self.fsdp_reduce_every_micro_step else "-reduce-once"))
        parts += [f"rc-{self.recompute}", f"mb{self.micro_batch}"]
        return " ".join(parts)

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> Layout:
        p = cfg.parallel
        dp = p.dp or world_size // (p.tp * p.pp * p.cp)
        return cls(dp=dp, dp_replicate=p.dp_split(dp)[0], tp=p.tp, pp=p.pp, cp=p.cp,
                   sequence_parallel=p.sequence_parallel, data_parallel=p.data_parallel,
                   reshard_after_forward=p.reshard_after_forward,
                   fsdp_reduce_every_micro_step=p.fsdp_reduce_every_micro_step,
                   pp_schedule=p.pp_schedule, virtual_stages=p.virtual_stages, recompute=p.recompute,
                   micro_batch=cfg.train.micro_batch, global_batch=cfg.train.global_batch,
                   minisequence_chunks=p.minisequence_chunks)


# ---------------------------------------------------------------------------------------------- model statistics

@dataclass(frozen=True)
class ModelStats:
    """Parameter counts and FLOPs of one model at one sequence length."""

    params: int
    """All parameters."""
    embed_params: int
    """Token (and position) embedding parameters: the first stage's extra weights."""
    head_params: int
    """Final norm + LM head parameters: the last stage's extra weights."""
    layer_params: float
    """Parameters of one block (average over blocks)."""
    mixer_params: float
    """Parameters of one block's sequence mixer."""
    flops_per_token: float
    """Training FLOPs per token, `pretrain.metrics.flops_per_token` (no recomputation)."""
    recompute_flops: dict
    """Forward FLOPs per token that each recompute mode repeats: {none, selective, full}."""


@functools.lru_cache(maxsize=64)
def _stats(model_json: str) -> ModelStats:
    import torch

    from pretrain.metrics import flops_per_token, mixer_flops_per_token
    from pretrain.models import build_model

    cfg = ModelConfig(**json.loads(model_json))
    with torch.device("meta"):  # counts without memory, even for models far larger than this machine
        model = build_model(cfg)
    count = {"embed": 0, "head": 0, "mixer": 0, "all": 0}
    mixer_params = [0] * cfg.n_layers  # each layer's sequence mixer
    for name, p in model.named_parameters():
        count["all"] += p.numel()
        if name.startswith(("tok_emb", "pos_emb")):
            count["embed"] += p.numel()
        elif name.startswith(("lm_head", "norm")):
            count["head"] += p.numel()
        elif ".mixer." in name:
            count["mixer"] += p.numel()
            mixer_params[int(name.split(".")[1])] += p.numel()
    L = cfg.n_layers
    fpt = flops_per_token(cfg)
    head_matmul = cfg.vocab_size * cfg.d_model
    # forward = 1/3 of forward + backward, of each mixer's s-dependent FLOPs; linear mixers recompute their
    # projections under selective too (a hybrid: layer by layer)
    selective = 0.0
    for i, mixer in enumerate(layer_mixers(cfg)):
        selective += mixer_flops_per_token(layer_config(cfg, i)) / 3
        selective += 0 if mixer in SOFTMAX_ARCHS else 2 * mixer_params[i]
    full = (fpt - 6 * head_matmul) / 3  # every block's forward; the LM head is outside the checkpointed blocks
    return ModelStats(params=count["all"], embed_params=count["embed"], head_params=count["head"],
                      layer_params=(count["all"] - count["embed"] - count["head"]) / L,
                      mixer_params=count["mixer"] / L, flops_per_token=fpt,
                      recompute_flops={"none": 0.0, "selective": selective, "full": full})


def model_stats(cfg: ModelConfig, seq_len: int) -> ModelStats:
    """Cached counts for `cfg` trained at `seq_len`."""
    return _stats(json.dumps(dataclasses.asdict(dataclasses.replace(cfg, seq_len=seq_len)), sort_keys=True))


def arch_label(cfg: ModelConfig) -> str:
    """The architecture as reports and calibration keys name it; a hybrid with its pattern:
    'hybrid(gla*3,transformer)'."""
    return f"hybrid({cfg.mixers})" if cfg.arch == "hybrid" else cfg.arch


def size_label(cfg: ModelConfig) -> str:
    """A model's size key for calibration: width × depth × heads (+ pro)."""
    return f"d{cfg.d_model}-L{cfg.n_layers}-H{cfg.n_heads}" + ("-pro" if cfg.pro else "")


# ---------------------------------------------------------------------------------- communication volumes (shared)
# Each returns {collective kind: (calls, payload bytes)} per step on one rank; bench/comm.py prints the payloads
# next to the bytes it counts on the wire, so the model's volumes are checked against the real collectives.

def tp_volume(*, s: int, b: int, h: int, layers: int, ends: int, micro_batches: int, dtype_bytes: int,
              sequence_parallel: bool, recompute_full: bool = False) -> dict[str, tuple[int, float]]:
    """Tensor parallelism: 4 activation collectives per block (2 forward: before the mixer and the MLP; 2 backward)
    plus one per vocab-parallel end (`ends`: embedding and/or LM head on this rank); full recomputation repeats the
    2 forward ones per block. TP+SP all-gathers and reduce-scatters each; TP alone all-reduces. The vocab-parallel
    loss all-reduces 3 fp32 numbers per token (max, sum of exponentials, target logit)."""
    m = micro_batches
    a = s * b * h * dtype_bytes
    n = m * ((4 + 2 * recompute_full) * layers + ends)
    out = {"all_gather": (n, n * a), "reduce_scatter": (n, n * a)} if sequence_parallel else {"all_reduce": (n, n * a)}
    loss = (3 * m, m * 3 * s * b * 4)
    if "all_reduce" in out:
        out["all_reduce"] = (out["all_reduce"][0] + loss[0], out["all_reduce"][1] + loss[1])
    else:
        out["all_reduce"] = loss
    return out


def dp_volume(param_count: float, *, units: int, micro_batches: int, fsdp: bool, reshard_after_forward: bool,
              reduce_every_micro_step: bool = True, gather_bytes: int,
              reduce_bytes: int) -> dict[str, tuple[int, float]]:
    """Data parallelism over this rank's `param_count` (its tp/pp share, unsharded), on the group that shards it
    (parallel.data_parallel.set_gradient_sync says when each happens). FSDP: every unit gathers its weights in
    each micro-step's forward and again in backward; without reshard_after_forward it gathers once per step and
    keeps them; gradients are reduce-scattered after every micro-step, or with `reduce_every_micro_step` off once,
    after the last. DDP: gradients all-reduced on the last micro-step, one call per bucket."""
    m = micro_batches
    if fsdp:
        gathers = 2 * m if reshard_after_forward else 1
        reduces = m if reduce_every_micro_step else 1
        return {"all_gather": (gathers * units, gathers * param_count * gather_bytes),
                "reduce_scatter": (reduces * units, reduces * param_count * reduce_bytes)}
    nbytes = param_count * reduce_bytes
    return {"all_reduce": (max(1, math.ceil(nbytes / DDP_BUCKET_BYTES)), nbytes)}


def hsdp_replicate_volume(param_count: float, *, units: int, dp_shard: int,
                          reduce_bytes: int) -> dict[str, tuple[int, float]]:
    """HSDP's replicas: each unit's reduce-scattered gradient shard (1/dp_shard of it) all-reduced over
    dp_replicate once per step, after the last micro-step, whichever way the shards were accumulated."""
    return {"all_reduce": (units, param_count * reduce_bytes / dp_shard)}


def pp_volume(*, s: int, b: int, h: int, tp: int, micro_batches: int, boundaries: int, dtype_bytes: int,
              sequence_parallel: bool, carry_boundaries: int) -> dict[str, tuple[int, float]]:
    """Pipeline p2p: per micro-batch and stage-boundary crossing of this rank (forward and backward each count),
    the hidden state (sequence-sharded under SP) and, on the `carry_boundaries` of them past the first RWKV-7
    layer, its carried first-layer value (tp-sharded)."""
    crossing = s * b * h * dtype_bytes // (tp if tp > 1 and sequence_parallel else 1)
    extra = s * b * h * dtype_bytes // tp
    n = micro_batches * boundaries
    nbytes = n * crossing + micro_batches * carry_boundaries * extra
    return {"send": (n, nbytes), "recv": (n, nbytes)}


def boundaries(pp_rank: int, pp: int, v: int) -> int:
    """Stage-boundary crossings per micro-batch of one pipeline rank (looped stages r, r + pp, …)."""
    n = pp * v
    return sum((i > 0) + (i < n - 1) for i in range(pp_rank, n, pp))


def carry_boundaries(model_cfg: ModelConfig, pp_rank: int, pp: int, v: int, spec: str = "") -> int:
    """Of `boundaries`' crossings, those that also carry RWKV-7's first-layer value: as parallel/pipeline.py's
    `stage_carries`, the boundaries after the first RWKV-7 layer (stages as `stage_layers` cuts them, `spec` being
    parallel.pp_layers)."""
    mixers = layer_mixers(model_cfg)
    if "rwkv7" not in mixers:
        return 0
    if model_cfg.arch != "hybrid" and not spec:  # every boundary of a pure RWKV-7 (no even split needed to say so)
        return boundaries(pp_rank, pp, v)
    from parallel.pipeline import stage_carries, stage_layers

    n = pp * v
    layers = stage_layers(model_cfg, n, spec)
    return sum(takes + (gives and i < n - 1)
               for i in range(pp_rank, n, pp) for takes, gives in [stage_carries(model_cfg, layers[i])])


def _head_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(key, value) width per head of the pure model config `cfg`'s mixer (GLA: keys are d/2 wide)."""
    d, H = cfg.d_model, cfg.n_heads
    return (d // 2 // H if cfg.arch == "gla" else d // H), d // H


def _add(out: dict, kind: str, calls: float, nbytes: float) -> None:
    c, n = out.get(kind, (0, 0.0))
    out[kind] = (c + calls, n + nbytes)


def cp_layer_volume(cfg: ModelConfig, *, s: int, b: int, cp: int, tp: int = 1, dtype_bytes: int,
                    recompute: str = "none", reduce_scatter: bool = True) -> dict[str, dict[str, tuple[int, float]]]:
    """Context parallelism: one block's collectives over the cp group for one micro-batch on one rank, split into
    {"ring": the ring's P2P (overlapped with the tile loop), "other": the rest (on the critical path)}, each
    {kind: (calls, payload bytes)} (payload as `bench/comm.py` counts it). `cfg`: the pure model config of the
    block's mixer (a hybrid's `layer_config`); s: the whole sequence; T_loc = s / cp steps on the rank, H / tp heads.

    - Ring attention (transformer, FoX): forward N−1 hops of k and v (and FoX's c in fp64), each one send and one
      receive per tensor; backward N−1 hops of them again plus N hops of one dK|dV(|dc) accumulator. The tile loop
      runs in fp32 whatever the activation dtype, so k, v and the accumulators travel as 4 bytes per element. FoX:
      one all-gather of the (2, b, H) chunk totals of log f in fp64, and its gradient reduced in backward.
    - State passing (GLA, RWKV-7): one all-gather of the 2 chunks' (S_loc, M) in fp32: b·H·K·(V + 1) (GLA: M's
      diagonal) or b·H·K·(V + K) elements per chunk; the same reduced in backward.
    - Halos: RWKV-7's time- and channel-mix token shifts, the Pro block's KV-shift of k and v: one all-gather of
      the rank's two chunk ends (2·b·width) each, reduced in backward.
    Backward's reductions are reduce-scatters (NCCL) or, with `reduce_scatter` off, all-reduces of the gathered
    size (gloo has no reduce-scatter). Recomputation repeats the forward collectives of what it recomputes: full,
    all of them; selective, the attend (ring or state passing, FoX's totals) and RWKV-7's time-mix halo.
    Without document masking; with it each key/value block also carries its int64 document ids, and one
    all-gather of per-chunk start counts per forward builds the plan."""
    N = cp
    if N == 1:
        return {"ring": {}, "other": {}}
    T_loc = s // N
    H = cfg.n_heads // tp
    K, V = _head_dims(cfg)
    reduce = "reduce_scatter" if reduce_scatter else "all_reduce"
    again = 1 if recompute in ("full", "selective") else 0  # forward collectives repeated by recomputation
    ring, other = {}, {}

    def gathered(width_bytes: float, times: int) -> None:  # a differentiable all-gather: forward + backward
        _add(other, "all_gather", times, times * N * width_bytes)
        _add(other, reduce, 1, N * width_bytes)

    if cfg.arch in SOFTMAX_ARCHS:
        fox = cfg.arch == "fox"
        block = [n for _, n in _ring_block(cfg, b=b, T_loc=T_loc, H=H)]
        hops = (N - 1) * (1 + again + 1)  # forward (and its recomputation), then backward
        for kind in ("send", "recv"):
            _add(ring, kind, hops * len(block), hops * sum(block))
            _add(ring, kind, N, N * b * H * T_loc * (K + V + fox) * 4)  # the accumulators travel N hops home
        if fox:
            gathered(2 * b * H * 8, 1 + again)
        if cfg.pro:
            gathered(2 * b * H * K * dtype_bytes, 1 + (recompute == "full"))
            gathered(2 * b * H * V * dtype_bytes, 1 + (recompute == "full"))
    else:
        trans = K if cfg.arch == "gla" else K * K  # GLA's transition is diagonal: only its diagonal travels
        gathered(2 * b * H * (K * V + trans) * 4, 1 + again)
        if cfg.arch == "rwkv7":
            d = cfg.d_model
            gathered(2 * b * d * dtype_bytes, 1 + again)  # time mix (inside the mixer: selective repeats it)
            gathered(2 * b * d * dtype_bytes, 1 + (recompute == "full"))  # channel mix
    return {"ring": ring, "other": other}


def cp_volume(cfg: ModelConfig, *, s: int, b: int, cp: int, tp: int = 1, micro_batches: int, dtype_bytes: int,
              layers: list[int] | None = None, loss: bool = True, recompute: str = "none",
              reduce_scatter: bool = True) -> dict[str, tuple[int, float]]:
    """Context parallelism's collectives per step on one rank: `cp_layer_volume` of each of `layers` (default: all)
    for every micro-batch, plus, with `loss`, the loss's all-reduce of (sum, count) in fp32 per micro-batch."""
    out: dict = {}
    if cp == 1:
        return out
    for i in range(cfg.n_layers) if layers is None else layers:
        for part in cp_layer_volume(layer_config(cfg, i), s=s, b=b, cp=cp, tp=tp, dtype_bytes=dtype_bytes,
                                    recompute=recompute, reduce_scatter=reduce_scatter).values():
            for kind, (calls, nbytes) in part.items():
                _add(out, kind, calls * micro_batches, nbytes * micro_batches)
    if loss:
        _add(out, "all_reduce", micro_batches, micro_batches * 2 * 4)
    return out


def ring_extra_bytes_per_layer(cfg: ModelConfig, *, s: int, b: int, t: int = 1, recompute: str = "none",
                               dtype_bytes: int = 2) -> float:
    """Activation bytes a block keeps beyond `activation_bytes_per_layer` under context parallelism (s: the rank's
    steps). Ring attention saves q, k, v and its output in fp32 (its tile loop's dtype) where a fused kernel keeps
    them in the activation dtype, plus its fp32 log-sum-exp (and FoX's fp64 c); under full recomputation nothing
    of it stays. State passing runs the op with V + K value columns (the identity columns that give M and R), so
    its output is (V + K)/V as wide; it is counted as one more output-width tensor at that ratio."""
    if recompute == "full":
        return 0.0
    H, (K, V) = cfg.n_heads, _head_dims(cfg)
    if cfg.arch in SOFTMAX_ARCHS:
        lse = b * s * H * (4 + (8 if cfg.arch == "fox" else 0))
        return (b * s * H * (2 * K + 2 * V) * (4 - dtype_bytes) + lse) / t
    if recompute == "selective":
        return 0.0
    return b * s * H * K * dtype_bytes / t


# ------------------------------------------------------------------------------------------------ α-β primitives

def collective_time(kind: str, *, calls: int, nbytes: float, group: int, alpha: float, beta: float) -> float:
    """Seconds of `calls` ring collectives of `kind` moving `nbytes` payload in all over `group` ranks."""
    if group <= 1 or calls == 0:
        return 0.0
    g = group
    if kind == "all_reduce":
        return 2 * (g - 1) / g * nbytes / beta + calls * 2 * (g - 1) * alpha
    if kind in ("all_gather", "reduce_scatter"):
        return (g - 1) / g * nbytes / beta + calls * (g - 1) * alpha
    if kind == "send":
        return nbytes / beta + calls * alpha
    if kind == "recv":  # the matching send is the one that takes time
        return 0.0
    raise ValueError(f"unknown collective {kind!r}")


def volume_time(volume: dict, *, group: int, alpha: float, beta: float) -> float:
    return sum(collective_time(kind, calls=c, nbytes=n, group=group, alpha=alpha, beta=beta)
               for kind, (c, n) in volume.items())


def bubble_fraction(pp: int, v: int, micro_batches: int, schedule: str) -> float:
    """Idle fraction of the pipelined work: (p−1)/(v·m); zero_bubble ASSUMED to leave a third (ZB-H1)."""
    if pp == 1:
        return 0.0
    frac = (pp - 1) / (v * micro_batches)
    return frac / 3 if schedule == "zero_bubble" else frac


# ------------------------------------------------------------------------------------------------------ memory

def _mixer_elements(cfg: ModelConfig) -> tuple[float, float]:  # cfg: a pure model's (a hybrid layer's view)
    """(replicated, tp-sharded) saved elements of one mixer in units of s·b·h, its input included, scores and
    chunk states excluded. Softmax (Korthikanti): input 1 | Q, K 2, V 1, output-projection input 1.
    GLA (key width h/2): input 1 | q .5, k .5, v 1, log-decay g in fp32 (.5 × 2), o 1, normed o 1, gate 1, gated 1.
    RWKV-7: the six token-shifted projection inputs 6 | r, k, v 3, log-decay w in fp32 2, κ̂, a, b 3, value
    residual mix 1, o 1, GroupNorm out 1, bonus 1, gate 1, gated 1. LoRA hiddens (rank ≪ h) are left out."""
    if cfg.arch in SOFTMAX_ARCHS:
        return 1.0, 4.0 + (5.0 if cfg.pro else 0.0)  # Pro: gate, gated output, QK-norm inputs, shifted keys
    if cfg.arch == "gla":
        return 1.0, 7.0
    return 6.0, 14.0


def activation_bytes_per_layer(cfg: ModelConfig, *, s: int, b: int, t: int = 1, sequence_parallel: bool = False,
                               recompute: str = "none", dtype_bytes: int = 2) -> float:
    """Saved-activation bytes of one block for one micro-batch (see the module docstring). With the gpt preset
    and dtype_bytes = 2 this is exactly Korthikanti et al.'s sbh(34 + 5as/h), sbh(10 + 24/t + 5as/(ht)),
    sbh(34/t + 5as/(ht)) for none / TP / TP+SP, without the 5as/h term for selective, and 2sbh for full.
    A hybrid's blocks differ: this is their mean (`activation_bytes_by_layer` gives each)."""
    per_layer = activation_bytes_by_layer(cfg, s=s, b=b, t=t, sequence_parallel=sequence_parallel,
                                          recompute=recompute, dtype_bytes=dtype_bytes)
    return sum(per_layer) / len(per_layer)


def activation_bytes_by_layer(cfg: ModelConfig, **kwargs) -> list[float]:
    """`activation_bytes_per_layer`'s bytes for each block (keyword arguments the same): each layer counted as the
    block of its mixer, the carry (the first RWKV-7 layer's values) from that layer on."""
    mixers = layer_mixers(cfg)
    source = mixers.index("rwkv7") if "rwkv7" in mixers else cfg.n_layers
    return [_block_activation_bytes(layer_config(cfg, i), carries=i >= source, **kwargs) for i in range(cfg.n_layers)]


def _block_activation_bytes(cfg: ModelConfig, *, carries: bool, s: int, b: int, t: int = 1,
                            sequence_parallel: bool = False, recompute: str = "none", dtype_bytes: int = 2) -> float:
    """One block of the pure model config `cfg` (a hybrid layer's view); `carries`: the RWKV-7 carry rides along."""
    from pretrain.models.common import mlp_hidden_size

    sbh = s * b * cfg.d_model
    sp = sequence_parallel and t > 1
    carry = 1.0 if carries else 0.0  # RWKV-7's first-layer value rides along every block from there on
    if recompute == "full":
        return (1.0 + carry) * sbh * dtype_bytes / (t if sp else 1)
    f = mlp_hidden_size(cfg) / cfg.d_model
    mixer_in, mixer = _mixer_elements(cfg)
    mlp = (4 if cfg.mlp == "swiglu" and cfg.arch != "rwkv7" else 2) * f
    masks = 2.0 if cfg.dropout > 0 else 0.0  # bytes per sbh: one 1-byte mask after the mixer and after the MLP
    replicated = (2 + mixer_in + 1) * dtype_bytes + masks  # two norm inputs, mixer input, MLP input
    extra = 0.0  # bytes not proportional to sbh, tp-sharded
    if recompute == "selective" and cfg.arch not in SOFTMAX_ARCHS:
        mixer = 0.0  # the whole linear mixer is recomputed from its input
    elif cfg.arch in SOFTMAX_ARCHS:
        if cfg.attn_impl == "unfused" and recompute != "selective":
            # softmax output, + its dropout mask (1 byte) and dropout output: 5as²b in bf16 (Korthikanti)
            per_score = dtype_bytes + ((1 + dtype_bytes) if cfg.dropout > 0 else 0)
            extra = cfg.n_heads * s * s * b * per_score
    else:
        heads = cfg.n_heads
        K = (cfg.d_model // 2 if cfg.arch == "gla" else cfg.d_model) / heads
        V = cfg.d_model / heads
        extra = b * (s / CHUNK) * heads * K * V * 4 * (2 if cfg.arch == "rwkv7" else 1)
    sharded = (mixer + mlp) * dtype_bytes
    if sp:
        return (replicated + sharded) * sbh / t + extra / t
    return replicated * sbh + sharded * sbh / t + extra / t


def rank_params(st: ModelStats, cfg: ModelConfig, layout: Layout) -> float:
    """Parameters on the busiest rank: its L/p blocks and, at the ends, the embedding or head; split over tp."""
    ends = st.embed_params + st.head_params if layout.pp == 1 else max(st.embed_params, st.head_params)
    return (st.layer_params * cfg.n_layers / layout.pp + ends) / layout.tp


def blocks_in_flight(layout: Layout, n_layers: int) -> float:
    """Blocks' worth of micro-batch activations the first pipeline rank holds at its peak."""
    p, v, m = layout.pp, layout.v, layout.micro_batches
    if p == 1:
        return n_layers
    if layout.pp_schedule == "1f1b":
        return min(m, p) * n_layers / p
    return min(m * v, (v - 1) * p + 2 * (p - 1) + 1) * n_layers / (p * v)


def memory_breakdown(cfg: ModelConfig, layout: Layout, seq_len: int, cluster: Cluster) -> dict[str, float]:
    """Predicted bytes per GPU on the first pipeline stage (the last for the logits when pp = 1)."""
    st = model_stats(cfg, seq_len)
    t, p = layout.tp, layout.pp
    stage_params = rank_params(st, cfg, layout)
    if layout.dp * layout.cp > 1 and layout.data_parallel == "fsdp":
        states = 16 * stage_params / layout.fsdp_shard
        if not layout.grads_sharded:
            states += 4 * stage_params * (1 - 1 / layout.fsdp_shard)  # the gradients accumulate unsharded
        gathered = (stage_params if not layout.reshard_after_forward
                    else FSDP_PREFETCH_UNITS * st.layer_params / t) * cluster.dtype_bytes
    else:
        states = 16 * stage_params
        gathered = stage_params * cluster.dtype_bytes if cluster.dtype_bytes < 4 else 0.0  # autocast's cast copies
    s_local = seq_len // layout.cp  # context parallelism: each rank holds 1/cp of every sequence
    per_layer = activation_bytes_per_layer(cfg, s=s_local, b=layout.micro_batch, t=t,
                                           sequence_parallel=layout.sp, recompute=layout.recompute,
                                           dtype_bytes=cluster.dtype_bytes)
    if layout.cp > 1:
        per_layer += ring_extra_bytes_per_layer(cfg, s=s_local, b=layout.micro_batch, t=t, recompute=layout.recompute,
                                                dtype_bytes=cluster.dtype_bytes)
    activations = per_layer * blocks_in_flight(layout, cfg.n_layers)
    logits = 0.0
    if p == 1:  # a pipelined run's last stage holds fewer micro-batches; the first stage is the peak
        logits = s_local * layout.micro_batch * cfg.vocab_size / t / layout.minisequence_chunks \
            * (cluster.dtype_bytes + 4)
    return {"weights_grads_optimizer": states, "gathered_weights": gathered, "activations": activations,
            "logits": logits, "reserved": cluster.reserved_bytes}


# -------------------------------------------------------------------------------------------------- prediction

@dataclass
class Prediction:
    """A PREDICTED step of one layout (nothing here is measured)."""

    layout: Layout
    """The layout predicted."""
    cluster: str
    """Cluster name."""
    step_time_s: float
    """Predicted seconds per optimizer step."""
    breakdown_s: dict
    """Predicted seconds per step: compute, tp_comm, dp_comm (exposed), pp_comm, bubble."""
    tokens_per_s: float
    """Predicted tokens/s over all GPUs."""
    tokens_per_s_per_gpu: float
    """Predicted tokens/s per GPU."""
    mfu: float
    """Predicted model FLOPs utilisation (model FLOPs without recomputation / peak)."""
    memory_bytes: float
    """Predicted peak bytes per GPU."""
    memory_breakdown: dict
    """Predicted bytes per GPU by kind."""
    fits_in_memory: bool
    """Predicted memory ≤ the device's memory."""
    compute_source: str
    """Where the compute rate came from: 'measured single-device' or 'peak × efficiency'."""
    kind: str = "prediction"
    """Always 'prediction': these numbers come from the model, not from a run."""

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layout": {**dataclasses.asdict(self.layout), "label": self.layout.label(),
                                                       "gpus": self.layout.gpus}}


def predict(model_cfg: ModelConfig, layout: Layout, seq_len: int, cluster: Cluster, *,
            single_device_tokens_per_s: float | None = None, single_device_recompute: str = "none") -> Prediction:
    """PREDICT one layout's step time, throughput and memory.

    `single_device_tokens_per_s` (measured on one device of this cluster, same model and seq_len, recompute mode
    `single_device_recompute`) sets the achieved FLOP/s; without it `peak_flops × efficiency` is used.
    """
    if layout.global_batch % (layout.dp * layout.micro_batch):
        raise ValueError(f"global_batch {layout.global_batch} is not a multiple of dp × micro_batch "
                         f"= {layout.dp} × {layout.micro_batch}.")
    st = model_stats(model_cfg, seq_len)
    fpt = st.flops_per_token
    if single_device_tokens_per_s:
        achieved = single_device_tokens_per_s * (fpt + st.recompute_flops[single_device_recompute])
        source = "measured single-device"
    else:
        achieved = cluster.peak_flops * cluster.efficiency
        source = "peak × efficiency"
    tokens = layout.global_batch * seq_len
    compute = tokens * (fpt + st.recompute_flops[layout.recompute] + cp_extra_flops_per_token(model_cfg, layout.cp)) \
        / layout.gpus / achieved

    t, p, d, m, b = layout.tp, layout.pp, layout.dp, layout.micro_batches, layout.micro_batch
    # TP's and PP's activation volumes below are per sequence piece: a cp rank's s / cp steps
    g = cluster.gpus_per_node
    h, L = model_cfg.d_model, model_cfg.n_layers
    tp_s = pp_s = dp_s = cp_s = 0.0
    if layout.cp > 1:
        cp_s = cp_time(model_cfg, layout, seq_len, cluster, achieved=achieved)
    if t > 1:
        vol = tp_volume(s=seq_len // layout.cp, b=b, h=h, layers=L // p, ends=2 if p == 1 else 1, micro_batches=m,
                        dtype_bytes=cluster.dtype_bytes, sequence_parallel=layout.sp,
                        recompute_full=layout.recompute == "full")
        alpha, beta = cluster.link(t > g)
        tp_s = volume_time(vol, group=t, alpha=alpha, beta=beta)
    if p > 1:
        vol = max((pp_volume(s=seq_len // layout.cp, b=b, h=h, tp=t, micro_batches=m,
                             boundaries=boundaries(r, p, layout.v), dtype_bytes=cluster.dtype_bytes,
                             sequence_parallel=layout.sp, carry_boundaries=carry_boundaries(model_cfg, r, p, layout.v))
                   for r in range(p)), key=lambda volume: volume["send"][1])  # the busiest pipeline rank
        alpha, beta = cluster.link(d * t * p > g)  # neighbours are dp·tp ranks apart
        pp_s = volume_time(vol, group=2, alpha=alpha, beta=beta)
    if d * layout.cp > 1:  # FSDP / DDP over dp × cp
        params, units, shard = rank_params(st, model_cfg, layout), L // p + 1, layout.fsdp_shard
        vol = dp_volume(params, units=units, micro_batches=m, fsdp=layout.data_parallel == "fsdp",
                        reshard_after_forward=layout.reshard_after_forward,
                        reduce_every_micro_step=layout.grads_sharded, gather_bytes=cluster.dtype_bytes,
                        reduce_bytes=4)
        alpha, beta = cluster.link(shard * t > g)
        dp_s = volume_time(vol, group=shard, alpha=alpha, beta=beta)
        if layout.dp_replicate > 1:  # replicas are dp_shard · tp ranks apart
            alpha, beta = cluster.link(d * t > g)
            dp_s += volume_time(hsdp_replicate_volume(params, units=units, dp_shard=shard, reduce_bytes=4),
                                group=layout.dp_replicate, alpha=alpha, beta=beta)
        dp_s *= 1 - cluster.dp_overlap
    bubble = bubble_fraction(p, layout.v, m, layout.pp_schedule) * (compute + tp_s + pp_s + cp_s)
    step = compute + tp_s + pp_s + cp_s + bubble + dp_s
    mem = memory_breakdown(model_cfg, layout, seq_len, cluster)
    total_mem = sum(mem.values())
    tps = tokens / step
    return Prediction(layout=layout, cluster=cluster.name, step_time_s=step,
                      breakdown_s={"compute": compute, "tp_comm": tp_s, "dp_comm": dp_s, "pp_comm": pp_s,
                                   "cp_comm": cp_s, "bubble": bubble},
                      tokens_per_s=tps, tokens_per_s_per_gpu=tps / layout.gpus,
                      mfu=fpt * tps / layout.gpus / cluster.peak_flops, memory_bytes=total_mem,
                      memory_breakdown=mem, fits_in_memory=total_mem <= cluster.memory_bytes, compute_source=source)


KERNEL_LATENCY_S = 5e-6  # ASSUMED: launch + run of one tiny kernel (a step of the state chain) on a GPU


def cp_extra_flops_per_token(cfg: ModelConfig, cp: int) -> float:
    """Training FLOPs per token that context parallelism adds: state passing runs the linear mixer's op with K
    identity value columns beside the V real ones, so the op's own term grows by K/V. Ring attention adds none (it
    computes the same causal tiles, spread over the ranks)."""
    if cp == 1:
        return 0.0
    from pretrain.metrics import mixer_flops_per_token

    extra = 0.0
    for i, mixer in enumerate(layer_mixers(cfg)):
        if mixer not in SOFTMAX_ARCHS:
            layer = layer_config(cfg, i)
            K, V = _head_dims(layer)
            extra += mixer_flops_per_token(layer) * K / V
    return extra


def cp_time(cfg: ModelConfig, layout: Layout, seq_len: int, cluster: Cluster, *, achieved: float) -> float:
    """PREDICTED seconds per step of context parallelism's exposed communication on one rank.

    Ring attention: each hop's transfer is posted before the tile loop of the block at hand, so a hop costs
    max(0, transfer − that block's compute): forward N−1 hops against 1/N of the rank's causal attention forward
    (2·s·d FLOPs per local token, half of 12·s·d/3), backward N−1 hops of k, v and an accumulator against twice
    that, the accumulator's last hop home exposed. Everything else (state passing's all-gather and its backward
    reduction, FoX's totals, the halos, the loss's all-reduce) is on the critical path, α-dominated; the state chain
    adds 2N sequential small matmuls (`KERNEL_LATENCY_S` each plus their FLOPs). The cp group's ranks are tp
    apart (mesh (pp, dp_replicate, dp_shard, cp, tp)): inter-node links once cp·tp exceeds a node."""
    N, t, b, m = layout.cp, layout.tp, layout.micro_batch, layout.micro_batches
    alpha, beta = cluster.link(N * t > cluster.gpus_per_node)
    T_loc = seq_len // N
    total = 0.0
    for i in range(cfg.n_layers // layout.pp):  # the first stage's blocks
        layer = layer_config(cfg, i)
        vol = cp_layer_volume(layer, s=seq_len, b=b, cp=N, tp=t, dtype_bytes=cluster.dtype_bytes,
                              recompute=layout.recompute)
        total += m * volume_time(vol["other"], group=N, alpha=alpha, beta=beta)
        H, (K, V) = layer.n_heads // t, _head_dims(layer)
        if layer.arch in SOFTMAX_ARCHS:
            kv_hop = sum(n for _, n in _ring_block(layer, b=b, T_loc=T_loc, H=H)) / beta + alpha
            acc_hop = b * H * T_loc * (K + V + (layer.arch == "fox")) * 4 / beta + alpha
            hop_compute = b * T_loc * 2 * seq_len * layer.d_model / t / achieved / N
            forward = (N - 1) * max(0.0, kv_hop - hop_compute)
            again = forward if layout.recompute in ("full", "selective") else 0.0
            backward = (N - 1) * max(0.0, kv_hop + acc_hop - 2 * hop_compute) + acc_hop
            total += m * (forward + again + backward)
        else:
            chain_flops = 2 * b * H * K * V * (1 if layer.arch == "gla" else 2 * K)
            total += m * 2 * N * (KERNEL_LATENCY_S + chain_flops / achieved) * (2 if layout.recompute != "none" else 1)
    total += collective_time("all_reduce", calls=m, nbytes=m * 8, group=N, alpha=alpha, beta=beta)  # the loss
    return total


def _ring_block(cfg: ModelConfig, *, b: int, T_loc: int, H: int) -> list[tuple[str, float]]:
    """The tensors one ring hop carries: (name, bytes); fp32 k and v, FoX's fp64 c."""
    K, V = _head_dims(cfg)
    block = [("k", b * T_loc * H * K * 4), ("v", b * T_loc * H * V * 4)]
    return block + ([("c", b * H * T_loc * 8)] if cfg.arch == "fox" else [])


# --------------------------------------------------------------------------------------- calibration, validation

def row_config(row: dict) -> Config:
    """The run's Config from a sweep row's full `config` dict (as Config.to_dict() wrote it)."""
    return build_config(row["config"], {})


def calibration_key(cfg: ModelConfig, seq_len: int) -> tuple[str, str, int]:
    return arch_label(cfg), size_label(cfg), seq_len


def calibrate(results_rows: list[dict]) -> dict[tuple[str, str, int], dict]:
    """Single-device throughput per (arch, size, seq_len) from measured sweep rows (status ok, one process).

    Returns {key: {"tokens_per_s", "recompute", "device", "point"}}; where one key was measured several times
    (different micro-batches or recompute modes), the fastest is kept: it is the rate the device can reach.
    """
    out: dict[tuple[str, str, int], dict] = {}
    for row in results_rows:
        if row.get("status") != "ok" or row.get("world_size") != 1 or not row.get("tokens_per_s"):
            continue
        cfg = row_config(row)
        key = calibration_key(cfg.model, cfg.model.seq_len)
        # compare by achieved FLOP/s so a faster-looking point without recomputation does not hide a better one
        st = model_stats(cfg.model, cfg.model.seq_len)
        rate = row["tokens_per_s"] * (st.flops_per_token + st.recompute_flops[cfg.parallel.recompute])
        if key not in out or rate > out[key]["achieved_flops"]:
            out[key] = {"tokens_per_s": row["tokens_per_s"], "recompute": cfg.parallel.recompute,
                        "achieved_flops": rate, "device": row.get("device"), "point": row.get("point")}
    return out


def predict_measured(results_rows: list[dict], cluster: Cluster) -> list[tuple[dict, Prediction]]:
    """(row, PREDICTION for its layout) for every measured (status ok) row whose model has a calibration point."""
    calibration = calibrate(results_rows)
    out = []
    for row in results_rows:
        if row.get("status") != "ok" or not row.get("tokens_per_s"):
            continue
        cfg = row_config(row)
        key = calibration_key(cfg.model, cfg.model.seq_len)
        if key in calibration:
            out.append((row, predict(cfg.model, Layout.from_config(cfg, row["world_size"]), cfg.model.seq_len,
                                     cluster, single_device_tokens_per_s=calibration[key]["tokens_per_s"],
                                     single_device_recompute=calibration[key]["recompute"])))
    return out


def validate(results_rows: list[dict], cluster: Cluster) -> list[dict]:
    """PREDICTED vs measured tokens/s (and memory) for every row `predict_measured` can place."""
    return [{"point": row.get("point"), "world_size": row["world_size"], "layout": pred.layout.label(),
             "measured_tokens_per_s": row["tokens_per_s"], "predicted_tokens_per_s": pred.tokens_per_s,
             "ratio": pred.tokens_per_s / row["tokens_per_s"], "measured_peak_memory_gb": row.get("peak_memory_gb"),
             "predicted_memory_gb": pred.memory_bytes / 1e9}
            for row, pred in predict_measured(results_rows, cluster)]


# ------------------------------------------------------------------------------------------------------ suggest

def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


MIN_CP_LOCAL_STEPS = 1024  # ASSUMED: below this many steps per rank a ring hop has too little compute to hide behind


def _model_parallel_splits(cfg: ModelConfig, seq_len: int, gpus: int, cluster: Cluster):
    """(tp, pp, cp) the training code accepts on `gpus` devices (parallel.mesh, config.check_cp): cp a power of two
    whose ranks keep at least MIN_CP_LOCAL_STEPS steps, seq_len divisible by 2·cp (and by cp·tp under SP), no
    attention dropout under cp."""
    from pretrain.models.common import mlp_hidden_size

    for tp in _divisors(gpus):
        if tp > cluster.gpus_per_node or cfg.n_heads % tp or mlp_hidden_size(cfg) % tp or seq_len % tp:
            continue
        for pp in _divisors(gpus // tp):
            if cfg.n_layers % pp or (pp > 1 and cfg.tie_embeddings):
                continue
            for cp in _divisors(gpus // (tp * pp)):
                if cp > 1 and (cp & (cp - 1) or seq_len % (2 * cp) or (seq_len // cp) % tp or cfg.dropout > 0
                               or seq_len // cp < MIN_CP_LOCAL_STEPS):
                    continue
                yield tp, pp, cp


def candidate_layouts(cfg: ModelConfig, seq_len: int, gpus: int, cluster: Cluster, global_batch: int, *,
                      micro_batches=(1, 2, 4, 8, 16)) -> list[Layout]:
    """Every layout the training code accepts on `gpus` devices (the checks of parallel.mesh.ParallelDims), context
    parallelism included where sequences are long enough (`_model_parallel_splits`)."""
    out = []
    for tp, pp, cp in _model_parallel_splits(cfg, seq_len, gpus, cluster):
        dp = gpus // (tp * pp * cp)
        if global_batch % dp:
            continue
        schedules = [("1f1b", 1)] if pp == 1 else \
            [("1f1b", 1)] + [(s, 2) for s in ("interleaved_1f1b", "zero_bubble") if cfg.n_layers % (2 * pp) == 0]
        # (mode, reshard_after_forward, reduce every micro-step, dp_replicate): FSDP both ways, and as HSDP
        # sharded inside a node and replicated across nodes where dp spans nodes; DDP
        dps = [("fsdp", True, True, 1)]
        if dp * cp > 1:
            per_node = max(1, cluster.gpus_per_node // (tp * cp))
            replicas = [1] + ([dp // per_node] if dp > per_node and dp % per_node == 0 else [])
            dps = [("fsdp", reshard, every, r) for r in replicas for reshard in (True, False)
                   for every in (True, False)] + [("ddp", True, True, 1)]
        for mb in micro_batches:
            if (global_batch // dp) % mb or (global_batch // (dp * mb)) % pp:
                continue
            for schedule, v in schedules:
                for mode, reshard, every, replicas in dps:
                    if not every and (pp > 1 or global_batch // (dp * mb) == 1):
                        continue  # the same layout: one micro-step, or a pipeline's own accumulation
                    for recompute in ("none", "selective", "full"):
                        out.append(Layout(dp=dp, dp_replicate=replicas, tp=tp, pp=pp, cp=cp,
                                          sequence_parallel=tp > 1,
                                          data_parallel=mode, reshard_after_forward=reshard,
                                          fsdp_reduce_every_micro_step=every, pp_schedule=schedule,
                                          virtual_stages=v if pp > 1 else 0, recompute=recompute,
                                          micro_batch=mb, global_batch=global_batch))
    return out


def suggest(model_cfg: ModelConfig, seq_len: int, gpus: int, cluster: Cluster, global_batch: int, *,
            single_device_tokens_per_s: float | None = None, single_device_recompute: str = "none",
            minisequence_chunks: int = 1) -> list[Prediction]:
    """PREDICTED layouts for `gpus` devices that fit in memory, fastest first."""
    preds = []
    for layout in candidate_layouts(model_cfg, seq_len, gpus, cluster, global_batch):
        layout = dataclasses.replace(layout, minisequence_chunks=minisequence_chunks)
        pred = predict(model_cfg, layout, seq_len, cluster, single_device_tokens_per_s=single_device_tokens_per_s,
                       single_device_recompute=single_device_recompute)
        if pred.fits_in_memory:
            preds.append(pred)
    return sorted(preds, key=lambda pr: pr.tokens_per_s, reverse=True)


# ---------------------------------------------------------------------------------------------- gloo α-β fit

def _time_all_reduce(sizes: list[int], iters: int) -> list[float]:
    """One rank: seconds of an all-reduce of each size (bytes, fp32), after a warm-up: the minimum over `iters`,
    the uncontended time (this machine is shared; medians moved 5x between runs, minima did not)."""
    import torch
    import torch.distributed as dist

    out = []
    for nbytes in sizes:
        x = torch.ones(nbytes // 4)
        for _ in range(3):
            dist.all_reduce(x)
        times = []
        for _ in range(iters):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - start)
        out.append(min(times))
    return out


def fit_alpha_beta(sizes: list[int], seconds: list[float], group: int) -> tuple[float, float]:
    """(α, β) of ring all-reduce times t = 2(g−1)·α + 2(g−1)/g · n/β, by least squares on the relative error
    (weights 1/t²), so the small messages that fix α count as much as the large ones that fix β."""
    xs = [2 * (group - 1) / group * n for n in sizes]
    w = [1 / t**2 for t in seconds]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    mt = sum(wi * t for wi, t in zip(w, seconds)) / sw
    slope = sum(wi * (x - mx) * (t - mt) for wi, x, t in zip(w, xs, seconds)) / \
        sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs))
    intercept = mt - slope * mx
    return max(intercept, 0.0) / (2 * (group - 1)), 1 / slope


def fit_gloo(*, sizes=(2**12, 2**16, 2**18, 2**20, 2**22, 2**24), iters: int = 30, processes: int = 2) -> dict:
    """Measure gloo all-reduce on `processes` local CPU processes and fit α, β (the cpu-gloo cluster's links)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.dist import run_distributed

    seconds = run_distributed(_time_all_reduce, processes, list(sizes), iters)[0]
    alpha, beta = fit_alpha_beta(list(sizes), seconds, processes)
    return {"processes": processes, "sizes_bytes": list(sizes), "min_seconds": seconds, "alpha_s": alpha,
            "beta_bytes_per_s": beta}


def measure_matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an fp32 n×n matmul on this process's threads (the CPU cluster's nominal peak)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# --------------------------------------------------------------------------------------------------------- CLI

def _si(x: float) -> str:
    return next((f"{x / scale:.2f}{unit}" for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))
                 if x >= scale), f"{x:.0f}")


def _format_table(preds: list[Prediction], cluster: Cluster, *, gpus: int, seq_len: int, global_batch: int,
                  model_cfg: ModelConfig, top: int) -> str:
    st = model_stats(model_cfg, seq_len)
    lines = [f"PREDICTIONS (performance model, not measurements) — {arch_label(model_cfg)} {size_label(model_cfg)} "
             f"({_si(st.params)} params, {_si(st.flops_per_token)}FLOP/token), seq {seq_len}, "
             f"global batch {global_batch}, {gpus} GPUs on {cluster.name}; compute rate: "
             f"{preds[0].compute_source if preds else '-'}",
             f"{'layout':<46}{'tok/s/GPU':>10}{'MFU':>7}{'step s':>9}{'compute':>9}{'tp':>8}{'dp':>8}{'pp':>8}"
             f"{'cp':>8}{'bubble':>8}{'mem GB':>8}"]
    for pr in preds[:top]:
        br = pr.breakdown_s
        lines.append(f"{pr.layout.label():<46}{pr.tokens_per_s_per_gpu:>10.0f}{100 * pr.mfu:>6.1f}%"
                     f"{pr.step_time_s:>9.3f}{br['compute']:>9.3f}{br['tp_comm']:>8.3f}{br['dp_comm']:>8.3f}"
                     f"{br['pp_comm']:>8.3f}{br['cp_comm']:>8.3f}{br['bubble']:>8.3f}{pr.memory_bytes / 1e9:>8.1f}")
    if not preds:
        lines.append("(no layout is predicted to fit in memory)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m launch.perfmodel",
        description="PREDICT step time, throughput and memory of layouts on N GPUs and suggest the fastest. "
                    "Model options come as in training: --config FILE.toml and --model.key=value overrides.",
        epilog="Every number printed is a prediction of the performance model (see the module docstring for "
               "what it models and what it leaves out).")
    parser.add_argument("--cluster", help="cluster TOML (configs/clusters/*.toml): device peak, memory, link α-β")
    parser.add_argument("--gpus", type=int, help="number of GPUs to lay the run out on")
    parser.add_argument("--seq-len", type=int, help="training sequence length (default: the config's model.seq_len)")
    parser.add_argument("--global-batch", type=int,
                        help="sequences per optimizer step (default: the config's train.global_batch)")
    parser.add_argument("--results", help="sweep results.jsonl: calibrate the compute rate from its single-device "
                                          "point of this model and print predicted vs measured for its rows")
    parser.add_argument("--tokens-per-s", type=float,
                        help="measured single-device tokens/s of this model and seq_len, without recomputation "
                             "(instead of --results)")
    parser.add_argument("--top", type=int, default=10, help="how many suggested layouts to print")
    parser.add_argument("--json", action="store_true", help="print JSON (predictions and validation) instead")
    parser.add_argument("--fit-gloo", action="store_true",
                        help="measure gloo all-reduce on 2 local processes, fit α and β, print them and exit")
    args, rest = parser.parse_known_args(argv)
    if args.fit_gloo:
        fit = fit_gloo()
        fit["matmul_flops"] = measure_matmul_flops()
        print(json.dumps(fit, indent=1))
        return
    if not args.cluster or not args.gpus:
        parser.error("--cluster and --gpus are needed (or --fit-gloo)")
    cfg = load_config(rest)
    cluster = Cluster.load(args.cluster)
    seq_len = args.seq_len or cfg.model.seq_len
    global_batch = args.global_batch or cfg.train.global_batch
    model_cfg = dataclasses.replace(cfg.model, seq_len=seq_len)
    rows = []
    if args.results:
        rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    tps, rc = args.tokens_per_s, "none"
    if rows and tps is None:
        point = calibrate(rows).get(calibration_key(model_cfg, seq_len))
        if point:
            tps, rc = point["tokens_per_s"], point["recompute"]
    preds = suggest(model_cfg, seq_len, args.gpus, cluster, global_batch, single_device_tokens_per_s=tps,
                    single_device_recompute=rc, minisequence_chunks=cfg.parallel.minisequence_chunks)
    validation = validate(rows, cluster) if rows else []
    if args.json:
        print(json.dumps({"kind": "prediction", "cluster": dataclasses.asdict(cluster), "gpus": args.gpus,
                          "seq_len": seq_len, "global_batch": global_batch, "model": dataclasses.asdict(model_cfg),
                          "suggestions": [pr.to_dict() for pr in preds[:args.top]],
                          "validation": validation}, indent=1))
        return
    print(_format_table(preds, cluster, gpus=args.gpus, seq_len=seq_len, global_batch=global_batch,
                        model_cfg=model_cfg, top=args.top))
    if validation:
        print("\nPREDICTED vs MEASURED (rows of --results with a calibration point)")
        print(f"{'point':<32}{'layout':<46}{'measured tok/s':>15}{'predicted':>12}{'ratio':>8}")
        for v in validation:
            print(f"{str(v['point']):<32}{v['layout']:<46}{v['measured_tokens_per_s']:>15.0f}"
                  f"{v['predicted_tokens_per_s']:>12.0f}{v['ratio']:>8.3f}")


if __name__ == "__main__":
    main()
