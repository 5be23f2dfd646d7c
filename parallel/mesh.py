"""`ParallelDims(dp_replicate, dp_shard, pp, cp, tp)`: the layout of the processes, its validation, and its named
DeviceMesh.

The mesh is (pp, dp_replicate, dp_shard, cp, tp), tp innermost: consecutive ranks (one node, NVLink) share the
tensor-parallel collectives that run in every layer. Context parallelism sits next to them: it also talks in every
layer (ring attention's key/value blocks, the linear mixers' state scan, the token shifts' one-step halo), so it
wants fast links too, but it moves less than TP (one layer's keys and values, or one state per head, against TP's
activations several times per layer) and overlaps its ring with compute, so TP keeps the innermost place. Then
FSDP's per-block all-gathers and reduce-scatters over dp_shard; HSDP's once-per-step all-reduce over dp_replicate
crosses nodes, and pipeline neighbours, which only exchange activations, are the farthest apart.

Flattened axes (registered on the root mesh by `build_mesh`):
- "dp" = dp_replicate · dp_shard: the data loader's axis. The cp ranks of a replica read the same batch, and each
  keeps its own part of every sequence.
- "dp_shard_cp" = dp_shard · cp: what FSDP shards parameters over (torchtitan's dp_shard_cp). Parameters are the
  same on every cp rank, and their gradients, each rank's share of the sequence, must be summed over cp too: so
  FSDP's reduce-scatter spans cp, and the cp ranks hold distinct shards instead of copies.
- "dp_cp" = dp_replicate · dp_shard · cp: every rank that holds the same model shard and different tokens; DDP
  (and plain FSDP) reduce gradients over it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.pipeline import SCHEDULES, stage_layers, virtual_stages
from pretrain.config import Config, ConfigError, validate_world
from pretrain.models.common import mlp_hidden_size

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> ParallelDims:
        """The layout `cfg.parallel` asks for on `world_size` processes; ConfigError if it cannot run."""
        replicate, shard = cfg.parallel.dp_split(validate_world(cfg, world_size))
        p = cfg.parallel
        dims = cls(dp_replicate=replicate, dp_shard=shard, pp=p.pp, cp=p.cp, tp=p.tp)
        dims.validate(cfg)
        return dims

    @property
    def dp(self) -> int:
        """Data-parallel degree: the model replicas' data shards (HSDP's replicas times its shards)."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    def validate(self, cfg: Config) -> None:
        """Reject layouts the model cannot be split into, with a message that says what to change."""
        m, p, t = cfg.model, cfg.parallel, cfg.train
        if self.tp > 1:
            if m.n_heads % self.tp:
                raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by parallel.tp={self.tp}: tensor "
                                  f"parallelism gives every process whole heads.")
            hidden = mlp_hidden_size(m)
            if hidden % self.tp:
                raise ConfigError(f"the feed-forward width {hidden} is not divisible by parallel.tp={self.tp}; "
                                  f"set model.mlp_multiple_of to a multiple of {self.tp}.")
            if p.sequence_parallel and m.seq_len % self.tp:
                raise ConfigError(f"model.seq_len={m.seq_len} is not divisible by parallel.tp={self.tp}, so sequence "
                                  f"parallelism cannot split it; change seq_len or set parallel.sequence_parallel=false.")
        if self.pp == 1:
            if p.pp_layers or p.virtual_stages > 1:
                raise ConfigError("parallel.pp_layers and parallel.virtual_stages need parallel.pp > 1.")
            return
        v = virtual_stages(p)
        if p.pp_schedule == "1f1b" and v != 1:
            raise ConfigError(f"parallel.pp_schedule='1f1b' runs one stage per process; use one of "
                              f"{', '.join(s for s in SCHEDULES if s != '1f1b')} for virtual_stages={v}.")
        stage_layers(m, self.pp * v, p.pp_layers)
        if m.tie_embeddings:
            raise ConfigError("model.tie_embeddings shares the first stage's embedding with the last stage's head; "
                              "untie them (model.tie_embeddings=false) to use pipeline parallelism.")
        micro_batches = t.micro_batches_per_step(self.dp)
        if micro_batches % self.pp:
            raise ConfigError(f"the pipeline gets global_batch / (micro_batch × dp) = {t.global_batch} / "
                              f"({t.micro_batch} × {self.dp}) = {micro_batches} micro-batches per step, not a "
                              f"multiple of parallel.pp={self.pp}; raise train.global_batch or lower train.micro_batch.")
        if t.eval_interval and t.eval_batches % micro_batches:
            raise ConfigError(f"train.eval_batches={t.eval_batches} must be a multiple of the pipeline's "
                              f"{micro_batches} micro-batches per step (it evaluates that many at a time).")

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The named mesh over every process, with its flattened axes "dp" and, with cp > 1, "dp_shard_cp" and "dp_cp"
        (see the module docstring; torch.distributed must be initialised)."""
        mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp),
                                mesh_dim_names=MESH_DIMS)
        # DeviceMesh has no public flatten in torch 2.13; `_flatten` registers the name on the root mesh, so
        # mesh.get_group("dp") and mesh.get_local_rank("dp") address the axes as one (data_parallel_mesh gives them)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        if self.cp > 1:  # each flattened axis makes process groups: only where context parallelism uses them
            mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
            mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return mesh


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 / DDP run over: the 1-D "dp_cp" axis ("dp" without context parallelism), or for HSDP the 2-D
    (dp_replicate, dp_shard_cp) mesh ((dp_replicate, dp_shard) without it), whose first axis `fully_shard` replicates
    over and second it shards over. Gradients are averaged over all of it: under context parallelism the loss is
    scaled for that (parallel/context_model.py)."""
    cp = mesh["cp"].size() > 1
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard_cp"] if cp else mesh["dp_replicate", "dp_shard"]
    # the flattened axis as build_mesh registered it (slicing it from the root mesh is deprecated)
    if cp:
        return mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    return mesh["dp_replicate", "dp_shard"]._flatten("dp")
