"""Packed, shuffled, exactly resumable batches per data-parallel rank, streamed from prepared shards.

    loader = Loader(".data/stdlib", seq_len=256, micro_batch=8, dp_rank=r, dp_size=n, seed=0)
    inputs, labels = next(loader)                 # [micro_batch, seq_len] int64 each
    state = loader.state_dict()                   # JSON-able; Loader(...).load_state_dict(state) resumes exactly

The token stream. Epoch e of a split is its documents concatenated (each ends with EOS) in this order: the
shards permuted by PCG64(seed, e), and inside each shard its documents permuted by PCG64(seed, e, shard). Epochs
follow each other into one infinite stream; window k is its tokens [k·seq_len, k·seq_len + seq_len + 1), so
consecutive windows share one boundary token and every token after the first is a label exactly once per epoch
(windows cross document, shard and epoch boundaries). The manifest's per-shard token counts locate any token
without opening a shard; a shard's document lengths come from its tar headers when it is opened.

Global sample g is window k = b·S + π_b(g mod S), b = g div S: a seeded permutation inside each block of
S = shuffle_window consecutive windows (the "buffer shuffle"; it stays seekable and local, so a block reads a
few shards, not all). Rank r of dp takes global samples consumed + r·micro_batch + i; every rank then advances
consumed by dp·micro_batch. The whole state is (consumed, seed): ranks agree without communicating, every
sample is read by exactly one rank, and a run may resume on another dp with the same global batch and continue
the same global stream. With num_workers = N > 0, DataLoader worker w builds every N-th micro-batch of its rank
and torch's round-robin delivery restores the order, so batches do not depend on N.

Documents: with return_doc_boundaries, batches are (inputs, labels, position_ids), position_ids [B, seq_len]
counting from 0 at each document's first token (the first token of a window continues its document's count);
`cu_seqlens(position_ids)` gives flash-attention's varlen boundaries.

Bad shards: a shard that is missing, truncated or corrupt, or holds a token id beyond the vocabulary (of its
manifest, or `vocab_size`, the model's), raises a ShardError naming it and the byte offset. With on_error="skip"
it is dropped instead (logged with a running count on logger "data"; shards skipped in DataLoader workers are
counted too): the stream is then laid out over the remaining shards, so the order changes from that point on,
never silently. A `*.tar` in a shard directory that its manifest does not list is named in a warning.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os

import numpy as np
import torch

from data.blend import BlendedStream, parse_blend
from data.shards import Manifest, Shard, ShardError, check_size
from data.tokenizer import load_tokenizer

log = logging.getLogger("data")
STATE_FORMAT = "stream-v1"
# PCG64 stream tags, so the shard order, document order and window shuffle never share random numbers.
_SHARDS, _DOCS, _WINDOWS = 0, 1, 2


class PackedStream:
    """Windows of seq_len+1 tokens over the infinite, shuffled token stream of one split (module docstring)."""

    def __init__(self, manifest: Manifest, split: str, *, seq_len: int, seed: int, component: int = 0,
                 shuffle: bool = True, shuffle_window: int = 1024, on_error: str = "raise", verify: bool = True,
                 open_shards: int = 16, vocab_size: int | None = None):
        self.manifest, self.split, self.seq_len, self.vocab_size = manifest, split, seq_len, vocab_size
        self.key = [seed, component]
        self.shuffle, self.shuffle_window = shuffle, shuffle_window if shuffle else 1
        # A local shard is a memory map; a remote one is held in memory whole, so keep fewer of those open.
        self.on_error, self.verify = on_error, verify
        self.open_shards = open_shards if manifest.local_dir is not None else min(open_shards, 3)
        self.entries = manifest.shards(split)
        self.skipped: dict[str, str] = {}
        self.active = []
        for i, entry in enumerate(self.entries):
            try:
                check_size(manifest, entry)
                self.active.append(i)
            except ShardError as e:
                self._skip_or_raise(e)
        self._layout()

    def _skip_or_raise(self, error: ShardError):
        if self.on_error != "skip":
            raise error
        self.skipped[error.shard] = str(error)
        log.warning("data.on_error=skip: skipping shard (%d skipped so far): %s", len(self.skipped), error)

    def _layout(self):
        self.tokens_per_epoch = sum(self.entries[i]["tokens"] for i in self.active)
        if self.tokens_per_epoch < self.seq_len + 1:
            raise ValueError(
                f"split {self.split!r} of {self.manifest.where} has {self.tokens_per_epoch} tokens"
                f"{' in usable shards' if self.skipped else ''}, fewer than seq_len+1 = {self.seq_len + 1}: "
                "prepare more text (or a larger --val-fraction for val) or lower seq_len")
        self._epochs: dict = {}
        self._docs: collections.OrderedDict = collections.OrderedDict()
        self._shards: collections.OrderedDict = collections.OrderedDict()
        self._index: collections.OrderedDict = collections.OrderedDict()
        self._blocks: dict = {}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([*self.key, *key]))

    def _epoch(self, e: int):
        """(shard ids in epoch order, their starting token offsets within the epoch [n+1])."""
        if e not in self._epochs:
            order = np.asarray(self.active, np.int64)
            if self.shuffle:
                order = order[self._rng(_SHARDS, e).permutation(len(order))]
            starts = np.concatenate([[0], np.cumsum([self.entries[i]["tokens"] for i in order])])
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (order, starts)
        return self._epochs[e]

    def _shard(self, i: int) -> Shard:
        """Shard i, from a small cache of open ones; the indexes of the last 16·open_shards shards are kept, so a
        shard is parsed and checksummed about once per process, not at every reopening."""
        shard = self._shards.get(i)
        if shard is None:
            shard = Shard(self.manifest, self.entries[i], verify=self.verify, index=self._index.get(i),
                          vocab_size=self.vocab_size)
            self._shards[i] = shard
            if len(self._shards) > self.open_shards:
                self._shards.popitem(last=False)
            self._index[i] = (shard.offsets, shard.lengths)
            if len(self._index) > 16 * self.open_shards:
                self._index.popitem(last=False)
        self._shards.move_to_end(i)
        self._index.move_to_end(i)
        return shard

    def _doc_order(self, e: int, i: int, shard: Shard):
        """(documents of shard i in epoch-e order, their starting offsets within the shard's tokens [n+1])."""
        key = (e, i)
        layout = self._docs.get(key)
        if layout is None:
            perm = np.arange(len(shard.lengths))
            if self.shuffle:
                perm = self._rng(_DOCS, e, i).permutation(len(perm))
            layout = (perm, np.concatenate([[0], np.cumsum(shard.lengths[perm])]))
            self._docs[key] = layout
            if len(self._docs) > 2 * self.open_shards:
                self._docs.popitem(last=False)
        return layout

    def window(self, g: int) -> int:
        """Window index of global sample g: a seeded permutation inside its block of shuffle_window windows."""
        size = self.shuffle_window
        if size == 1:
            return g
        b, r = divmod(g, size)
        perm = self._blocks.get(b)
        if perm is None:
            perm = self._rng(_WINDOWS, b).permutation(size)
            self._blocks = {b: perm}
        return b * size + int(perm[r])

    def fill(self, g: int, tokens: np.ndarray, positions: np.ndarray | None = None):
        """Write global sample g's seq_len+1 tokens (and their in-document positions) into the given rows."""
        while True:
            try:
                return self._read(self.window(g) * self.seq_len, tokens, positions)
            except ShardError as e:
                self._skip_or_raise(e)
                self.active = [i for i in self.active if self.manifest.url(self.entries[i]["name"]) != e.shard]
                self._layout()

    def _read(self, t: int, out: np.ndarray, positions: np.ndarray | None):
        n, filled = len(out), 0
        while filled < n:
            e, u = divmod(t, self.tokens_per_epoch)
            order, starts = self._epoch(e)
            s = int(np.searchsorted(starts, u, "right")) - 1
            shard = self._shard(int(order[s]))
            perm, doc_starts = self._doc_order(e, int(order[s]), shard)
            off = u - int(starts[s])
            d = int(np.searchsorted(doc_starts, off, "right")) - 1
            while filled < n and d < len(perm):
                begin = off - int(doc_starts[d])
                take = min(int(doc_starts[d + 1]) - off, n - filled)
                out[filled:filled + take] = shard.tokens(int(perm[d]), begin, begin + take)
                if positions is not None:
                    positions[filled:filled + take] = np.arange(begin, begin + take)
                filled, off, t, d = filled + take, off + take, t + take, d + 1

    def epoch(self, consumed: int) -> int:
        """Epoch of the first token of global sample `consumed` (in stream order, before the window shuffle)."""
        return consumed * self.seq_len // self.tokens_per_epoch

    def windows(self) -> int:
        """Windows that fit in one epoch (the fixed validation set)."""
        return (self.tokens_per_epoch - 1) // self.seq_len


# ---------------------------------------------------------------------------------------------------- opening data


def _sources(path: str, blend: str) -> list[tuple[float, str]]:
    return parse_blend(blend) if blend else [(1.0, path)]


def open_manifests(path: str, blend: str = "") -> list[tuple[float, Manifest]]:
    """(weight, manifest) of `path`, or of every `data.blend` entry; all must share one tokenizer."""
    out = [(w, Manifest(p)) for w, p in _sources(path, blend)]
    first = out[0][1]
    for _, m in out[1:]:
        if m.tokenizer != first.tokenizer:
            raise ValueError(f"data.blend mixes tokenizers: {first.where} has {first.tokenizer}, {m.where} has "
                             f"{m.tokenizer}; prepare every dataset with the same tokenizer")
    return out


def build_stream(manifests: list[tuple[float, Manifest]], split: str, *, blended: bool, seq_len: int, seed: int,
                 shuffle: bool = True, shuffle_window: int = 1024, on_error: str = "raise", verify: bool = True,
                 vocab_size: int | None = None):
    """A PackedStream over the one manifest of `open_manifests`, or (`blended`, from a `data.blend`) a BlendedStream
    over all of them (component i shuffled with key (seed, i)). `vocab_size`: the model's embedding rows; token ids
    are checked against it as each shard is opened."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    if shuffle_window < 1:
        raise ValueError(f"data.shuffle_window must be >= 1, got {shuffle_window}")
    streams = [PackedStream(m, split, seq_len=seq_len, seed=seed, component=i, shuffle=shuffle,
                            shuffle_window=shuffle_window, on_error=on_error, verify=verify, vocab_size=vocab_size)
               for i, (_, m) in enumerate(manifests)]
    if not blended:
        return streams[0]
    return BlendedStream(streams, [w for w, _ in manifests])


def warn_unlisted_shards(manifests: list[tuple[float, Manifest]]) -> None:
    """Name the `*.tar` files in a local shard directory that its manifest does not list: they are never read.

    A warning, not an error: the manifest defines the dataset (with every shard's checksum), so what trains is
    exactly what it lists, and a file beside it can be deliberate (a shard set aside, a subset manifest); but a
    user who added shards by hand expecting them to be read must hear that they are not."""
    for _, m in manifests:
        if m.local_dir is None:
            continue
        listed = {e["name"] for split in m.data["splits"].values() for e in split["shards"]}
        unlisted = sorted(n for n in os.listdir(m.local_dir) if n.endswith(".tar") and n not in listed)
        if unlisted:
            shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
            log.warning("%d shard file(s) in %s are not in its manifest and will not be read: %s. To train on them, "
                        "prepare them into a dataset of their own (add it with data.blend) or re-run data.prepare "
                        "over all the text; otherwise move them out of the directory", len(unlisted), m.local_dir,
                        shown)


def fingerprint(manifests: list[tuple[float, Manifest]]) -> str:
    """Identifies the data a state was saved on: the manifests' contents and the blend weights."""
    parts = [(w, m.sha256) for w, m in manifests]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def check_vocab(manifests: list[tuple[float, Manifest]], vocab_size: int) -> int:
    """Raise if the ids of the data (`open_manifests`) do not fit a model with `vocab_size` embedding rows; returns
    the data's vocab. The first manifest speaks for all: `open_manifests` checked that they share one tokenizer."""
    _, m = manifests[0]
    need = m.tokenizer["vocab_size"]
    if need > vocab_size:
        raise ValueError(
            f"{m.where} was tokenized with a {need}-token vocabulary ({m.tokenizer['kind']}) but the model has "
            f"vocab_size={vocab_size}; set model.vocab_size to at least {need} (e.g. --model.vocab_size={need})")
    return need


def check_tokenizer(manifests: list[tuple[float, Manifest]], tokenizer) -> None:
    """Raise if `tokenizer` (a spec or object) is not the one the data (`open_manifests`) was prepared with.

    A spec is loaded with the end-of-document token the manifest records (prepare's --eos-token), so data made
    with a chosen EOS needs no setting beyond data.tokenizer; the file itself is still compared by sha256."""
    _, m = manifests[0]
    if isinstance(tokenizer, str):
        eos_token = m.tokenizer.get("eos_token") if tokenizer != "byte" else None
        try:
            tok = load_tokenizer(tokenizer, eos_token)
        except ValueError as e:  # the data's EOS is not in this file: not the data's tokenizer
            raise ValueError(f"{m.where} was prepared with tokenizer {m.tokenizer}, but data.tokenizer "
                             f"{tokenizer!r} cannot be it ({e}); set data.tokenizer to the tokenizer used at "
                             "prepare time (see manifest.json)") from None
    else:
        tok = tokenizer
    if tok.identity != m.tokenizer:
        raise ValueError(
            f"{m.where} was prepared with tokenizer {m.tokenizer} but data.tokenizer gives {tok.identity}; set "
            "data.tokenizer to the tokenizer used at prepare time (see manifest.json) or re-run data.prepare")


# ---------------------------------------------------------------------------------------------------- batches


def read_rows(stream, start: int, count: int, seq_len: int, boundaries: bool) -> torch.Tensor:
    """Global samples start .. start+count-1: tokens [count, seq_len+1], with positions stacked after them
    ([2, count, seq_len+1]) when `boundaries`; one tensor, so a DataLoader worker sends one shared-memory block."""
    rows = np.empty((2 if boundaries else 1, count, seq_len + 1), np.int64)
    for i in range(count):
        stream.fill(start + i, rows[0, i], rows[1, i] if boundaries else None)
    return torch.from_numpy(rows)


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(inputs, labels[, position_ids]), [count, seq_len] int64 each, from read_rows' tensor."""
    out = (rows[0, :, :-1].contiguous(), rows[0, :, 1:].contiguous())
    return out + (rows[1, :, :-1].contiguous(),) if len(rows) == 2 else out


def make_batch(stream, start: int, count: int, seq_len: int, boundaries: bool) -> tuple[torch.Tensor, ...]:
    """Global samples start .. start+count-1 as (inputs, labels[, position_ids]), [count, seq_len] int64 each."""
    return split_rows(read_rows(stream, start, count, seq_len, boundaries))


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative document lengths over the flattened batch [n_docs+1] int32, longest piece) for varlen attention.

    A piece starts at every row start and wherever position_ids is 0.
    """
    b, t = position_ids.shape
    starts = (position_ids == 0)
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1)).squeeze(1)  # [n_docs]
    bounds = torch.cat([idx, torch.tensor([b * t], device=idx.device)]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


class _RankBatches(torch.utils.data.IterableDataset):
    """One rank's micro-batches from `first` on; DataLoader worker w of N yields batches w, w+N, w+2N, …, each as
    (read_rows' tensor, the shards this worker skipped since its previous batch), so the trainer can count them."""

    def __init__(self, spec: dict, *, first: int, dp_rank: int, dp_size: int, micro_batch: int, boundaries: bool):
        super().__init__()
        self.spec, self.first, self.boundaries = spec, first, boundaries
        self.dp_rank, self.dp_size, self.micro_batch = dp_rank, dp_size, micro_batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = build_stream(**self.spec)
        step = self.dp_size * self.micro_batch
        reported = set()
        j = w
        while True:
            start = self.first + j * step + self.dp_rank * self.micro_batch
            rows = read_rows(stream, start, self.micro_batch, self.spec["seq_len"], self.boundaries)
            skipped = {name: why for name, why in stream.skipped.items() if name not in reported}
            reported.update(skipped)
            yield rows, skipped
            j += n


def _check_layout(seq_len: int, micro_batch: int, dp_rank: int, dp_size: int):
    if seq_len < 1 or micro_batch < 1:
        raise ValueError(f"seq_len and micro_batch must be >= 1, got seq_len={seq_len}, micro_batch={micro_batch}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")


class Loader:
    """Infinite, shuffled, per-rank training batches whose whole state is the number of consumed global samples.

    `path`: a shard directory, its manifest.json, or a manifest URL webdataset opens (file:, pipe:, http(s));
    `blend`: 'W:PATH,W:PATH' to mix several such datasets instead (data/blend.py); `vocab_size`: the model's
    embedding rows (model.vocab_size), which every token id must be below; `manifests`: `open_manifests(path,
    blend)` where the caller has them already (the trainer checks them first), so they are read once.
    """

    def __init__(self, path: str, split: str = "train", *, seq_len: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, blend: str = "", num_workers: int = 0, on_error: str = "raise",
                 return_doc_boundaries: bool = False, shuffle_window: int = 1024, verify: bool = True,
                 vocab_size: int | None = None, manifests: list[tuple[float, Manifest]] | None = None):
        _check_layout(seq_len, micro_batch, dp_rank, dp_size)
        if seed < 0 or num_workers < 0:
            raise ValueError(f"seed and num_workers must be >= 0, got {seed}, {num_workers}")
        if manifests is None:
            manifests = open_manifests(str(path), blend)
        # DataLoader workers build their streams from these manifests too, rather than reading them again
        self._spec = dict(manifests=manifests, split=split, blended=bool(blend), seq_len=seq_len, seed=seed,
                          shuffle_window=shuffle_window, on_error=on_error, verify=verify, vocab_size=vocab_size)
        self.stream = build_stream(**self._spec)
        warn_unlisted_shards(manifests)
        self._fingerprint = fingerprint(manifests)
        self.split, self.seq_len, self.micro_batch, self.seed = split, seq_len, micro_batch, seed
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.boundaries = return_doc_boundaries
        self.consumed = 0
        self._batches = None
        self._skipped_in_workers: dict[str, str] = {}

    @property
    def epoch(self) -> int:
        return self.stream.epoch(self.consumed)

    @property
    def skipped_shards(self) -> dict:
        """Shards dropped under on_error='skip' so far by this loader and its DataLoader workers (name → reason)."""
        return {**self.stream.skipped, **self._skipped_in_workers}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self.num_workers == 0:
            batch = make_batch(self.stream, self.consumed + self.dp_rank * self.micro_batch, self.micro_batch,
                               self.seq_len, self.boundaries)
        else:
            if self._batches is None:
                dataset = _RankBatches(self._spec, first=self.consumed, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                       micro_batch=self.micro_batch, boundaries=self.boundaries)
                # its own generator: the workers' base seed must not be drawn from torch's default one, which
                # dropout's per-step streams own (parallel/random.py; resume is bitwise only if nothing else draws)
                self._batches = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                                 prefetch_factor=4, generator=torch.Generator()))
            rows, skipped = next(self._batches)
            self._skipped_in_workers.update(skipped)
            batch = split_rows(rows)
        self.consumed += self.dp_size * self.micro_batch
        return batch

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "split": self.split, "shuffle_window": self._spec["shuffle_window"], "data": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data loader state {sorted(state)} is not from data.stream ({STATE_FORMAT}); it was "
                             "saved by another data loader, so this run cannot resume its data position")
        mine = self.state_dict()
        for key, hint in (("seed", "train.seed"), ("seq_len", "model.seq_len"), ("split", "the split"),
                          ("shuffle_window", "data.shuffle_window")):
            if state[key] != mine[key]:
                raise ValueError(f"data loader state was saved with {key}={state[key]!r} but this run has "
                                 f"{key}={mine[key]!r}; set {hint} back to {state[key]!r} to resume exactly")
        if state["data"] != mine["data"]:
            raise ValueError("data loader state was saved on different data (another manifest or blend); point "
                             "data.path / data.blend at the original datasets to resume exactly")
        self.consumed = int(state["consumed"])
        self._batches = None  # prefetched batches belong to the old position


class ValLoader:
    """Fixed validation batches: global batch j is windows [j·G, (j+1)·G) in file order (G = dp_size·micro_batch),
    of which rank r takes its micro_batch slice. Stateless, so every call yields the same batches. `path`, `blend`,
    `vocab_size` and `manifests` as for `Loader`."""

    def __init__(self, path: str, split: str = "val", *, seq_len: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, blend: str = "", on_error: str = "raise", return_doc_boundaries: bool = False,
                 vocab_size: int | None = None, manifests: list[tuple[float, Manifest]] | None = None):
        _check_layout(seq_len, micro_batch, dp_rank, dp_size)
        if manifests is None:
            manifests = open_manifests(str(path), blend)
        self.stream = build_stream(manifests, split, blended=bool(blend), seq_len=seq_len, seed=0, shuffle=False,
                                   on_error=on_error, vocab_size=vocab_size)
        self.seq_len, self.micro_batch, self.dp_rank, self.dp_size = seq_len, micro_batch, dp_rank, dp_size
        self.boundaries = return_doc_boundaries
        windows = self.stream.windows()
        self.num_batches = windows // (dp_size * micro_batch)
        if self.num_batches == 0:
            raise ValueError(
                f"split {split!r} of {blend or path} has {windows} windows of {seq_len + 1} tokens, fewer than one "
                f"global batch (dp_size*micro_batch = {dp_size * micro_batch}); prepare with a larger --val-fraction, "
                "or lower micro_batch / seq_len")

    def batches(self, n: int):
        """The first min(n, num_batches) batches of this rank; identical on every call."""
        global_batch = self.dp_size * self.micro_batch
        for j in range(min(n, self.num_batches)):
            start = j * global_batch + self.dp_rank * self.micro_batch
            yield make_batch(self.stream, start, self.micro_batch, self.seq_len, self.boundaries)


SYNTHETIC = "synthetic"


class SyntheticLoader:
    """Uniformly random tokens with Loader's interface, for throughput studies and smoke tests (data.path =
    'synthetic'): step time does not depend on the token values, and nothing has to be prepared first.

    Global sample g is drawn from a generator seeded with (seed, g), so batches depend on neither dp_size nor the
    resume point, exactly as with Loader. The loss stays near log(vocab_size): nothing here is learnable.
    """

    def __init__(self, vocab_size: int, *, seq_len: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0):
        _check_layout(seq_len, micro_batch, dp_rank, dp_size)
        self.vocab_size, self.seq_len, self.micro_batch, self.seed = vocab_size, seq_len, micro_batch, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed = 0
        self.epoch = 0
        self.skipped_shards: dict = {}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.consumed + self.dp_rank * self.micro_batch
        rows = torch.stack([torch.randint(self.vocab_size, (self.seq_len + 1,),
                                          generator=torch.Generator().manual_seed(self.seed * 2**32 + g))
                            for g in range(first, first + self.micro_batch)])  # (B, T + 1)
        self.consumed += self.dp_size * self.micro_batch
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "data": SYNTHETIC}

    def load_state_dict(self, state: dict) -> None:
        if state.get("data") != SYNTHETIC or state.get("seed") != self.seed or state.get("seq_len") != self.seq_len:
            raise ValueError(f"data loader state {state.get('data')!r} (seed {state.get('seed')}, seq_len "
                             f"{state.get('seq_len')}) is not this run's synthetic data (seed {self.seed}, seq_len "
                             f"{self.seq_len}); resume with the data and settings it was saved with")
        self.consumed = state["consumed"]
