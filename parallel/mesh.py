"""`ParallelDims(dp, pp, tp)`: the layout of the processes, its validation, and its named DeviceMesh.

The mesh is (pp, dp, tp), tp innermost: consecutive ranks (one node, NVLink) share the tensor-parallel
collectives that run in every layer, and pipeline neighbours, which only exchange activations, are the
farthest apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.pipeline import SCHEDULES, split_layers, virtual_stages
from pretrain.config import Config, ConfigError, validate_world
from pretrain.models.common import mlp_hidden_size

MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    pp: int = 1
    tp: int = 1

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> ParallelDims:
        """The layout `cfg.parallel` asks for on `world_size` processes; ConfigError if it cannot run."""
        dims = cls(dp=validate_world(cfg, world_size), pp=cfg.parallel.pp, tp=cfg.parallel.tp)
        dims.validate(cfg)
        return dims

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

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
        split_layers(m.n_layers, self.pp * v, p.pp_layers)
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
        """The named mesh over every process (torch.distributed must be initialised)."""
        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=MESH_DIMS)
