"""One dataclass tree for a run: TOML files plus `--section.key=value` overrides, validated before any work.

    cfg = load_config(["--config", "configs/transformer-tiny.toml", "--optim.lr=1e-3"])

Precedence (later wins): field defaults < the model preset (`model.preset`) < the TOML file < the command
line. Every field has a default and a one-line docstring; `--help` prints them all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration problem, with a message that says how to fix it."""


@dataclass
class ModelConfig:
    arch: str = "transformer"
    """Architecture: transformer | fox | gla | rwkv7 | hybrid (each layer's mixer from model.mixers)."""
    mixers: str = ""
    """Hybrid: each layer's mixer, comma-separated, NAME*K repeats (e.g. 'gla*3,transformer'), repeated to n_layers."""
    preset: str = ""
    """Named bundle of defaults applied before the file and command line: '' or 'gpt' (Korthikanti et al. GPT)."""
    d_model: int = 256
    """Hidden size h."""
    n_layers: int = 4
    """Number of blocks."""
    n_heads: int = 4
    """Attention / recurrent heads; d_model must be divisible by it."""
    vocab_size: int = 257
    """Embedding rows; at least the tokenizer's vocabulary (257 for the byte tokenizer)."""
    seq_len: int = 256
    """Training context length in tokens (also the size of the learned position table)."""
    norm: str = "rmsnorm"
    """Normalisation layer: rmsnorm | layernorm."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    mlp: str = "swiglu"
    """Feed-forward type: swiglu | gelu."""
    mlp_ratio: float = 8 / 3
    """Feed-forward hidden size as a multiple of d_model (rounded up to mlp_multiple_of)."""
    mlp_multiple_of: int = 32
    """Round the feed-forward hidden size up to a multiple of this (GPU-friendly shapes)."""
    bias: bool = False
    """Biases on linear layers and LayerNorm (the GPT preset uses them)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches."""
    pos: str = "auto"
    """Position information: auto (rope for transformer; none for fox, gla, rwkv7) | rope | learned | none."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    attn_impl: str = "auto"
    """Sequence-mixer kernel: auto | sdpa | flex | fla | unfused | torch (auto picks the fastest available)."""
    pro: bool = False
    """FoX/Transformer 'Pro' block: output gate, QK-norm, output norm, KV-shift."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self):
        # Resolved here, not in the loader, so a ModelConfig made directly in Python means the same thing.
        if self.pos == "auto":  # FoX, GLA and RWKV-7 take order from their gates / recurrence
            softmax = self.arch == "transformer" or (self.arch == "hybrid" and "transformer" in _pattern_names(self))
            self.pos = "rope" if softmax else "none"  # a hybrid: rotary in its transformer layers only


MODEL_PRESETS: dict[str, dict[str, typing.Any]] = {
    # The GPT of Korthikanti et al. 2022: its activation-memory formulas assume exactly this block.
    "gpt": dict(arch="transformer", norm="layernorm", mlp="gelu", mlp_ratio=4.0, mlp_multiple_of=1,
                bias=True, dropout=0.1, pos="learned", attn_impl="unfused", pro=False),
}


@dataclass
class ParallelConfig:
    dp: int = 0
    """Data-parallel degree (= dp_replicate × dp_shard); 0 = the processes left over after tp × pp × cp."""
    dp_replicate: int = 0
    """HSDP: replicas of the FSDP-sharded model (across nodes); 0 = dp / dp_shard, or 1 (plain FSDP) if both are 0."""
    dp_shard: int = 0
    """HSDP: processes one replica's FSDP shards span (inside a node); 0 = dp / dp_replicate."""
    tp: int = 1
    """Tensor-parallel degree: heads, feed-forward width and vocabulary split over this many processes."""
    pp: int = 1
    """Pipeline-parallel degree: the blocks split into stages over this many processes."""
    cp: int = 1
    """Context-parallel degree: every sequence split over this many ranks through every layer."""
    sequence_parallel: bool = True
    """With tp > 1: norms, dropout and residuals run on sequence shards (Megatron-style sequence parallelism)."""
    sp_regather: bool = False
    """With tp > 1 and SP: mixers and MLPs keep their input's shard, all-gathered again in backward (CPU-verified)."""
    data_parallel: str = "fsdp"
    """The dp axis: fsdp (FSDP2, parameters and optimizer state sharded) | ddp (replicated, gradients all-reduced)."""
    reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward, gather again in backward (false, and zero_bubble: once a step)."""
    fsdp_reduce_every_micro_step: bool = True
    """FSDP: reduce-scatter gradients after each micro-step, so they stay sharded (false: unsharded, once per step)."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: 1f1b | interleaved_1f1b | zero_bubble (interleaved zero-bubble); micro-batches are train.micro_batch."""
    virtual_stages: int = 0
    """Pipeline stages per pp process; 0 = 1 for 1f1b and 2 for the interleaved schedules."""
    pp_layers: str = ""
    """Blocks per pipeline stage, comma-separated in stage order (e.g. '3,5'); '' = an even split."""
    compile: bool = False
    """torch.compile each block (CUDA only)."""
    recompute: str = "none"
    """Activation recomputation: none | selective (each mixer's attention or chunked recurrence) | full (blocks)."""
    recompute_modules: str = ""
    """Selective: extra block submodules to recompute, comma-separated (e.g. 'mlp,norm')."""
    recompute_every: int = 1
    """Full: recompute every k-th block (layer index % k == 0); 1 = all."""
    recompute_first: int = 0
    """Full: recompute only blocks with layer index below this (the first n); 0 = no limit."""
    minisequence_chunks: int = 1
    """Mini-sequence (MsT): run each MLP and the LM head + loss in this many sequence chunks; 1 = off."""

    def dp_split(self, dp: int) -> tuple[int, int]:
        """(dp_replicate, dp_shard) of `dp` data-parallel processes: a 0 is dp divided by the other (both 0: 1 × dp).
        `validate_world` checks that their product is dp."""
        replicate = self.dp_replicate or (dp // self.dp_shard if self.dp_shard else 1)
        return replicate, self.dp_shard or dp // max(replicate, 1)


@dataclass
class DataConfig:
    path: str = ".data/stdlib"
    """Shards of `python -m data.prepare` (directory, manifest.json or its URL), or 'synthetic' (random tokens)."""
    tokenizer: str = "byte"
    """Tokenizer the data was prepared with: 'byte', a tokenizer.json or a .tiktoken file (checked against the data)."""
    blend: str = ""
    """Mix datasets instead of data.path: 'WEIGHT:PATH,WEIGHT:PATH' (e.g. '0.7:.data/web,0.3:.data/code')."""
    val_path: str = ""
    """Validation data: shards whose val split is used ('' = the val split of data.path or of each blend entry)."""
    on_error: str = "raise"
    """Missing, truncated or corrupt shard: raise (stop, naming shard and offset) | skip (drop it; logged, counted)."""
    num_workers: int = 0
    """DataLoader worker processes per rank building batches (0 = in the training process); same order for any N."""
    shuffle_window: int = 1024
    """Windows shuffled together per block of the stream (a seekable buffer shuffle); part of the resume state."""
    document_mask: bool = False
    """Keep packed documents apart: attention stays inside each document, recurrent states and token shifts restart."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: cosine | wsd | constant."""
    warmup_steps: int = 20
    """Linear warm-up steps from 0 to the peak."""
    decay_fraction: float = 0.2
    """WSD only: the fraction of train.steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (never on norms, biases or embeddings)."""
    rwkv7_reference_groups: bool = True
    """RWKV-7: BlinkDL's param groups (2× lr on w₀; decay only matrices outside the LoRAs, embedding and head too)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class TrainConfig:
    steps: int = 200
    """Planned optimizer steps: the horizon of the learning-rate schedule."""
    global_batch: int = 16
    """Sequences per optimizer step across all data-parallel ranks."""
    micro_batch: int = 8
    """Sequences per forward/backward on one rank; global_batch / (micro_batch * dp) micro-steps accumulate."""
    exit_after_steps: int = 0
    """Save a checkpoint and exit after this many steps of this process (0 = run to train.steps)."""
    exit_after_minutes: float = 0.0
    """Save a checkpoint and exit once this process has run this long (0 = no limit)."""
    requeue: bool = True
    """Under SLURM, requeue the job when a stop signal or the wall-time budget ended it early (it then resumes)."""
    collective_timeout_minutes: float = 10.0
    """Timeout of every collective; a report naming the stalled rank and step comes at half of it."""
    sync_every: int = 10
    """Agree on stop signals and the time budget every this many steps (and on logged steps); others never sync."""
    seed: int = 1234
    """Seed for initialisation, data order and dropout."""
    run_dir: str = "runs/default"
    """Where checkpoints, metrics.jsonl and TensorBoard files go."""
    device: str = "auto"
    """auto (CUDA when present, else CPU) | cpu | cuda."""
    dtype: str = "auto"
    """Compute dtype under autocast: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."""
    eval_interval: int = 50
    """Compute validation loss every this many steps (0 = never)."""
    eval_batches: int = 4
    """Micro-batches per rank in each validation."""

    def micro_batches_per_step(self, dp: int) -> int:
        """Micro-batches each of `dp` data-parallel ranks runs per optimizer step (accumulated, or a pipeline's)."""
        return self.global_batch // (self.micro_batch * dp)


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Save every this many steps (0 = only at exit)."""
    keep_last: int = 3
    """Keep the newest this many checkpoints (0 = keep all)."""
    resume: str = "auto"
    """auto (newest complete checkpoint in run_dir, if any) | none (start fresh; old ones are moved aside) | a path."""
    save_at_end: bool = True
    """Save after the last step (sweeps turn it off: they time steps and keep no weights)."""
    async_save: bool = False
    """Write checkpoints in the background: training waits only while the state is copied to host memory."""


@dataclass
class LogConfig:
    interval: int = 10
    """Log a summary line, metrics.jsonl row and TensorBoard scalars every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run_dir>/tb/."""
    progress: bool = True
    """Print the console progress line (rank 0 only)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The sequence mixers a layer can have (model.arch of a pure model, the names in model.mixers).
MIXER_NAMES = ("transformer", "fox", "gla", "rwkv7")

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
CHOICES = {
    "model.arch": (*MIXER_NAMES, "hybrid"),
    "model.preset": ("", *MODEL_PRESETS),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.mlp": ("swiglu", "gelu"),
    "model.pos": ("auto", "rope", "learned", "none"),
    "model.attn_impl": ("auto", "sdpa", "flex", "fla", "unfused", "torch"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "data.on_error": ("raise", "skip"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "bf16", "fp32"),
    "parallel.data_parallel": ("fsdp", "ddp"),
    "parallel.pp_schedule": ("1f1b", "interleaved_1f1b", "zero_bubble"),
    "parallel.recompute": ("none", "selective", "full"),
}


# Kernels each architecture can run: SDPA cannot add FoX's forget gate; GLA and RWKV-7 are not softmax.
ATTN_IMPLS = {
    "transformer": ("auto", "sdpa", "unfused"),
    "fox": ("auto", "torch", "fla", "flex", "unfused"),
    "gla": ("auto", "torch", "fla"),
    "rwkv7": ("auto", "torch", "fla"),
}


def _pattern_names(m: ModelConfig) -> set[str]:
    """The names model.mixers mentions, read leniently (validation happens in `layer_mixers`)."""
    return {part.partition("*")[0].strip() for part in m.mixers.split(",")}


def layer_mixers(m: ModelConfig) -> list[str]:
    """The sequence mixer of each of the model.n_layers layers: model.arch for a pure model; for model.arch='hybrid'
    the model.mixers pattern ('NAME' or 'NAME*K' entries) expanded and repeated to n_layers. ConfigError on an
    unknown name, a bad count or a pattern whose length does not divide n_layers."""
    if m.arch != "hybrid":
        return [m.arch] * m.n_layers
    if not m.mixers.strip():
        raise ConfigError("model.arch='hybrid' needs model.mixers, each layer's mixer: e.g. 'gla*3,transformer' "
                          "(three GLA layers, then softmax attention, repeated to model.n_layers).")
    pattern: list[str] = []
    for part in m.mixers.split(","):
        name, star, count = (piece.strip() for piece in part.partition("*"))
        if name not in MIXER_NAMES:
            raise ConfigError(f"model.mixers='{m.mixers}': '{name}' is not a mixer.{_suggest(name, MIXER_NAMES)} "
                              f"Mixers: {', '.join(MIXER_NAMES)}.")
        if star and not (count.isdigit() and int(count) > 0):
            raise ConfigError(f"model.mixers='{m.mixers}': '{part.strip()}' should repeat its mixer a positive whole "
                              f"number of times, e.g. '{name}*3'.")
        pattern += [name] * (int(count) if star else 1)
    if m.n_layers % len(pattern):
        multiples = range(len(pattern), 4 * len(pattern) + 1, len(pattern))
        raise ConfigError(f"model.mixers='{m.mixers}' names {len(pattern)} layers, which does not repeat to "
                          f"model.n_layers={m.n_layers}; give a pattern whose length divides n_layers, or set "
                          f"n_layers to a multiple of {len(pattern)} (e.g. {', '.join(map(str, multiples))}).")
    return pattern * (m.n_layers // len(pattern))


def layer_config(m: ModelConfig, layer: int) -> ModelConfig:
    """The config a pure model of layer `layer`'s mixer would have: `m` itself for a pure model; for a hybrid, `m`
    with that mixer as model.arch and the positions it takes (rotary only in transformer layers; learned positions
    live in the shared embedding, so every layer just sees model.pos='learned'; none stays none)."""
    if m.arch != "hybrid":
        return m
    mixer = layer_mixers(m)[layer]
    pos = "none" if m.pos == "rope" and mixer != "transformer" else m.pos
    return dataclasses.replace(m, arch=mixer, mixers="", pos=pos)


def check_mixers(m: ModelConfig) -> None:
    """ConfigError if model.mixers is malformed, set without model.arch='hybrid', or another model option conflicts
    with one of the mixers present (model.attn_impl must run every one of them; model.pos='rope' needs a transformer
    layer)."""
    if m.mixers.strip() and m.arch != "hybrid":
        raise ConfigError(f"model.mixers='{m.mixers}' is read only by model.arch='hybrid'; set model.arch='hybrid', "
                          f"or leave model.mixers empty for a pure {m.arch} model.")
    present = set(layer_mixers(m))
    for mixer in sorted(present):
        if m.attn_impl not in ATTN_IMPLS[mixer]:
            common = [impl for impl in ATTN_IMPLS[mixer] if all(impl in ATTN_IMPLS[other] for other in present)]
            raise ConfigError(f"model.attn_impl='{m.attn_impl}' is not available for {mixer}"
                              + (f", a layer of model.mixers='{m.mixers}'; use one every mixer runs: "
                                 f"{', '.join(common)}." if m.arch == "hybrid"
                                 else f"; use one of {', '.join(ATTN_IMPLS[mixer])}."))
    if m.pos == "rope" and "transformer" not in present:
        raise ConfigError(f"model.pos='rope' is for transformer layers; "
                          f"{m.mixers if m.arch == 'hybrid' else m.arch} takes order from its gates "
                          f"(use model.pos=auto or none).")


def _section_class(name: str) -> type:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}[name]


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _default(section: str, name: str):
    """A field's default value, for messages that suggest one."""
    return next(f.default for f in dataclasses.fields(_section_class(section)) if f.name == name)


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _whole_number(key: str, value: str | float) -> int:
    """An int field given as text or a TOML float: '12', or a whole number spelt as a float ('2e3', 4.0).
    Anything else is refused rather than truncated (int('2.7e0') would be 2)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a valid int.") from None
    if not number.is_integer():
        example = f", e.g. {math.floor(number)} or {math.ceil(number)}" if math.isfinite(number) else ""
        raise ConfigError(f"{key}={value!r} must be a whole number{example}.")
    return int(number)


def _coerce(key: str, value, typ):
    """Turn a TOML or command-line value into the field's type, or explain why it cannot be."""
    if typ is int and isinstance(value, (str, float)):
        return _whole_number(key, value)
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return typ(text)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a valid {typ.__name__}.") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} should be a {typ.__name__}, got {type(value).__name__}.")
    return value


def _merge(tree: dict, overrides: dict, origin: str) -> None:
    """Check `overrides` ({section: {key: value}}) against the schema and merge it into `tree`."""
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] in {origin}.{_suggest(section, SECTIONS)} "
                              f"Sections: {', '.join(SECTIONS)}.")
        if not isinstance(values, dict):
            raise ConfigError(f"'{section}' in {origin} must be a table of keys, e.g. [{section}].")
        types = _field_types(_section_class(section))
        for key, value in values.items():
            if key not in types:
                raise ConfigError(f"unknown key '{section}.{key}' in {origin}.{_suggest(key, types)} "
                                  f"Run with --help to list every option.")
            tree.setdefault(section, {})[key] = _coerce(f"{section}.{key}", value, types[key])


def _parse_overrides(args: list[str]) -> dict:
    """`--section.key=value` or `--section.key value` → {section: {key: "value"}}."""
    out: dict[str, dict] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"cannot read argument '{arg}': overrides look like --section.key=value "
                              f"(e.g. --optim.lr=3e-4).")
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            name, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"'{arg}' needs a value: {arg}=VALUE.")
        section, key = name.split(".", 1)
        out.setdefault(section, {})[key] = value
        i += 1
    return out


def build_config(file_values: dict | None = None, cli_values: dict | None = None, *,
                 file_name: str = "the config file") -> Config:
    """Layer defaults < preset < file < command line, build the dataclasses and validate them."""
    tree: dict[str, dict] = {}
    _merge(tree, file_values or {}, file_name)
    _merge(tree, cli_values or {}, "the command line")
    preset = tree.get("model", {}).get("preset", "")
    if preset:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"model.preset='{preset}' is unknown.{_suggest(preset, MODEL_PRESETS)} "
                              f"Presets: {', '.join(MODEL_PRESETS)}.")
        tree["model"] = {**MODEL_PRESETS[preset], **tree["model"]}
    cfg = Config(**{name: _section_class(name)(**tree.get(name, {})) for name in SECTIONS})
    validate(cfg)
    return cfg


@functools.cache
def fla_available() -> bool:
    """Whether fla-core (what model.attn_impl 'fla', and 'auto' on CUDA, run) is installed. Found without importing it,
    which would import torch and triton: config code stays light (`python -m launch submit` validates configs on
    login nodes). A package that is there but cannot load still fails at the first kernel call, saying why."""
    return importlib.util.find_spec("fla") is not None


def kernel_warning(m: ModelConfig, device_type: str) -> str | None:
    """Why model.attn_impl=auto runs slower on `device_type` than it could (fla-core missing on CUDA), or None."""
    fla_mixers = sorted(mixer for mixer in set(layer_mixers(m)) if "fla" in ATTN_IMPLS[mixer])
    if device_type == "cuda" and m.attn_impl == "auto" and fla_mixers and not fla_available():
        return (f"model.attn_impl=auto: fla-core does not import, so {', '.join(fla_mixers)} runs the project's "
                f"PyTorch ops on CUDA instead of fla's Triton kernels; install them: pip install -e '.[gpu]'")
    return None


def validate(cfg: Config) -> None:
    """Reject impossible or contradictory settings with a message that says how to fix them."""
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise ConfigError(f"{key}='{value}' is not one of {', '.join(repr(o) for o in options)}."
                              f"{_suggest(str(value), options)}")
    # nan and inf slip through every range check below (nan <= 0 is False), so no float field may hold them.
    for section in SECTIONS:
        values = getattr(cfg, section)
        for name, typ in _field_types(type(values)).items():
            if typ is float and not math.isfinite(getattr(values, name)):
                raise ConfigError(f"{section}.{name}={getattr(values, name)} is not a finite number; give a real "
                                  f"value (the default is {_default(section, name)}).")
    m, t, o = cfg.model, cfg.train, cfg.optim
    positive = {"model.d_model": m.d_model, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
                "model.vocab_size": m.vocab_size, "model.seq_len": m.seq_len, "train.steps": t.steps,
                "train.global_batch": t.global_batch, "train.micro_batch": t.micro_batch,
                "model.mlp_multiple_of": m.mlp_multiple_of, "log.interval": cfg.log.interval,
                "model.norm_eps": m.norm_eps, "model.rope_theta": m.rope_theta, "model.init_std": m.init_std,
                "optim.eps": o.eps, "train.eval_batches": t.eval_batches, "train.sync_every": t.sync_every}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}; the default is {_default(*key.split('.'))}.")
    off_at_zero = {"optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip,
                   "train.eval_interval": t.eval_interval}
    for key, value in off_at_zero.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0 turns it off), got {value}.")
    for key, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0.0 <= beta < 1.0:  # at 1 AdamW's bias correction divides by zero; above, its averages diverge
            raise ConfigError(f"{key}={beta} must be in [0, 1); the default is {_default(*key.split('.'))}.")
    if not 0 <= t.seed < 2**32:  # the data order's generators take seed · 2^32 + sample index as a 64-bit seed
        raise ConfigError(f"train.seed={t.seed} must be in [0, 2^32).")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
                          f"pick n_heads among {[h for h in range(1, 65) if m.d_model % h == 0]}.")
    if m.pos == "rope" and (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"RoPE needs an even head dim; d_model/n_heads = {m.d_model // m.n_heads}.")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}.")
    if m.mlp_ratio <= 0:
        raise ConfigError(f"model.mlp_ratio must be positive, got {m.mlp_ratio}.")
    check_mixers(m)
    if m.attn_impl == "fla" and not fla_available():
        raise ConfigError("model.attn_impl='fla' needs fla-core (flash-linear-attention's Triton kernels), which does "
                          "not import here: pip install -e '.[gpu]', or use model.attn_impl=auto (fla where it "
                          "imports, else the PyTorch ops).")
    if o.lr <= 0 or not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.lr must be > 0 and optim.min_lr_ratio in [0, 1]; got {o.lr}, {o.min_lr_ratio}.")
    if o.warmup_steps < 0 or o.warmup_steps >= t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be in [0, train.steps={t.steps}).")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}.")
    if t.global_batch % t.micro_batch:
        raise ConfigError(f"train.global_batch={t.global_batch} must be a multiple of "
                          f"train.micro_batch={t.micro_batch} (times the data-parallel degree).")
    if t.collective_timeout_minutes <= 0:
        raise ConfigError(f"train.collective_timeout_minutes must be positive, got {t.collective_timeout_minutes}.")
    if t.exit_after_steps < 0 or t.exit_after_minutes < 0:
        raise ConfigError("train.exit_after_steps and train.exit_after_minutes must be >= 0 (0 = off).")
    if cfg.data.num_workers < 0 or cfg.data.shuffle_window < 1:
        raise ConfigError(f"data.num_workers must be >= 0 and data.shuffle_window >= 1; got "
                          f"{cfg.data.num_workers}, {cfg.data.shuffle_window}.")
    if cfg.data.path == "synthetic" and cfg.data.document_mask:
        raise ConfigError("data.document_mask needs documents, and data.path='synthetic' has none; prepare a dataset "
                          "with `python -m data.prepare` or set data.document_mask=false.")
    if cfg.data.path == "synthetic" and (t.eval_interval or cfg.data.blend):
        raise ConfigError("data.path='synthetic' has no validation split and cannot be blended; set "
                          "train.eval_interval=0 and data.blend=''.")
    c = cfg.checkpoint
    if c.interval < 0 or c.keep_last < 0:
        raise ConfigError("checkpoint.interval and checkpoint.keep_last must be >= 0 (0 = off / keep all).")
    p = cfg.parallel
    if p.tp < 1 or p.pp < 1 or min(p.dp, p.dp_replicate, p.dp_shard, p.virtual_stages) < 0:
        raise ConfigError(f"parallel.tp and parallel.pp must be >= 1, parallel.dp, parallel.dp_replicate, "
                          f"parallel.dp_shard and parallel.virtual_stages >= 0 (0 = automatic); got tp={p.tp}, "
                          f"pp={p.pp}, dp={p.dp}, dp_replicate={p.dp_replicate}, dp_shard={p.dp_shard}, "
                          f"virtual_stages={p.virtual_stages}.")
    if p.dp and p.dp_replicate and p.dp_shard and p.dp_replicate * p.dp_shard != p.dp:
        raise ConfigError(f"parallel.dp_replicate × parallel.dp_shard = {p.dp_replicate} × {p.dp_shard} = "
                          f"{p.dp_replicate * p.dp_shard} but parallel.dp={p.dp}; set one of them to 0 (derived "
                          f"from the others) or make dp their product.")
    if p.pp_layers and not all(part.strip().isdigit() for part in p.pp_layers.split(",")):
        raise ConfigError(f"parallel.pp_layers='{p.pp_layers}' should be block counts separated by commas, e.g. '3,5'.")
    if p.recompute_first < 0:
        raise ConfigError(f"parallel.recompute_first must be >= 0 (0 = every block), got {p.recompute_first}.")
    if p.recompute_every < 1 or p.minisequence_chunks < 1:
        raise ConfigError(f"parallel.recompute_every and parallel.minisequence_chunks must be >= 1; "
                          f"got {p.recompute_every}, {p.minisequence_chunks}.")
    if p.recompute_modules and p.recompute != "selective":
        raise ConfigError(f"parallel.recompute_modules='{p.recompute_modules}' needs parallel.recompute=selective.")
    _validate_context_parallel(cfg)


def _validate_context_parallel(cfg: Config) -> None:
    """parallel.cp: what context parallelism (parallel/context.py, parallel/context_model.py) can split."""
    m, p = cfg.model, cfg.parallel
    if p.cp < 1:
        raise ConfigError(f"parallel.cp must be >= 1 (1 = off), got {p.cp}.")
    if p.cp == 1:
        return
    if m.seq_len % (2 * p.cp):
        raise ConfigError(f"model.seq_len={m.seq_len} is not divisible by 2 × parallel.cp = {2 * p.cp}: context "
                          f"parallelism cuts each sequence into 2·cp chunks (rank r keeps chunks r and 2·cp−1−r, "
                          f"which balances causal work); pick a seq_len that is a multiple of {2 * p.cp}.")
    if m.dropout > 0 and "transformer" in layer_mixers(m):
        raise ConfigError(f"model.dropout={m.dropout} also drops softmax-attention probabilities, which ring attention "
                          f"(parallel.cp={p.cp}) does not do; set model.dropout=0 or parallel.cp=1.")
    if p.tp > 1 and p.sequence_parallel and (m.seq_len // p.cp) % p.tp:
        raise ConfigError(f"each context-parallel rank holds seq_len / cp = {m.seq_len} / {p.cp} = {m.seq_len // p.cp} "
                          f"steps, not divisible by parallel.tp={p.tp} for sequence parallelism; pick a seq_len that "
                          f"is a multiple of {2 * p.cp * p.tp} or set parallel.sequence_parallel=false.")
    if p.compile:
        raise ConfigError(f"parallel.compile with parallel.cp={p.cp} is not supported yet (the ring's send/recv and "
                          f"the state scan are untested inside compiled blocks); set parallel.compile=false.")


def validate_world(cfg: Config, world_size: int) -> int:
    """Check the layout against the number of processes; return the data-parallel degree.
    (`parallel.mesh.ParallelDims.from_config` adds the checks that depend on the model.)"""
    p = cfg.parallel
    # the world is dp × pp × cp × tp; cp is named in the messages only where it is on
    names, sizes = ("tp × pp", f"{p.tp} × {p.pp}") if p.cp == 1 else ("tp × pp × cp", f"{p.tp} × {p.pp} × {p.cp}")
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        fields = " / ".join(f"parallel.{name}" for name in names.split(" × "))
        raise ConfigError(f"{names} = {sizes} = {model_parallel} does not divide the {world_size} processes started; "
                          f"start a multiple of {model_parallel} processes or change {fields}.")
    dp = p.dp or world_size // model_parallel
    if dp * model_parallel != world_size:
        raise ConfigError(f"dp × {names} = {dp} × {sizes} = {dp * model_parallel} but {world_size} processes "
                          f"were started; set parallel.dp=0 (the processes left over) or start "
                          f"{dp * model_parallel} processes.")
    replicate, shard = p.dp_split(dp)
    if p.dp_replicate and p.dp_shard and replicate * shard != dp:
        raise ConfigError(f"parallel.dp_replicate × parallel.dp_shard = {replicate} × {shard} = {replicate * shard} "
                          f"but the data-parallel degree is dp = {dp}; set one of them to 0 (dp divided by the "
                          f"other) or start {replicate * shard * model_parallel} processes.")
    if replicate * shard != dp:
        name, value = ("dp_replicate", p.dp_replicate) if p.dp_replicate else ("dp_shard", p.dp_shard)
        raise ConfigError(f"parallel.{name}={value} does not divide the data-parallel degree dp = {dp}: HSDP needs "
                          f"equal groups; pick a divisor of {dp}.")
    if replicate > 1 and p.data_parallel != "fsdp":
        raise ConfigError(f"dp_replicate = {replicate} asks for HSDP (FSDP shards replicated across groups), which "
                          f"needs parallel.data_parallel='fsdp'; DDP replicates over all of dp already, so leave "
                          f"parallel.dp_replicate and parallel.dp_shard at 0.")
    per_step = cfg.train.micro_batch * dp
    if cfg.train.global_batch % per_step:
        raise ConfigError(f"train.global_batch={cfg.train.global_batch} is not a multiple of micro_batch × dp "
                          f"= {cfg.train.micro_batch} × {dp}; change train.global_batch or train.micro_batch.")
    return dp


def help_text() -> str:
    lines = ["usage: python -m pretrain.train [--config FILE.toml] [--section.key=VALUE ...]", "",
             "Options (default in brackets):"]
    for section in SECTIONS:
        cls = _section_class(section)
        lines.append(f"\n[{section}]")
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{section}.{f.name:<22} {docs.get(f.name, '')} [{json.dumps(default)}]")
    lines.append("\nPresets: " + "; ".join(f"{k}: {v}" for k, v in MODEL_PRESETS.items()))
    return "\n".join(lines)


def _field_docs(cls) -> dict[str, str]:
    """Field docstrings: the string literal that follows each field in the class body."""
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def load_config(argv: list[str] | None = None) -> Config:
    """Parse `--config FILE` plus `--section.key=value` overrides; `--help` prints every option."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    known, rest = parser.parse_known_args(argv)
    if known.help:
        print(help_text())
        raise SystemExit(0)
    file_values = read_toml(known.config) if known.config else {}
    return build_config(file_values, _parse_overrides(rest), file_name=str(known.config))


def read_toml(path: str | Path) -> dict:
    """A TOML file's tables; ConfigError if it is missing or not TOML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; the configs/ directory has examples.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
