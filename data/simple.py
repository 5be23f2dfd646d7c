"""Minimal data path: text files → flat token arrays on disk → exact, resumable batches per data-parallel rank.

Prepare (one document per file, EOS appended after each):

    python -m data.simple --input stdlib --output .data/stdlib --max-bytes 4M
    python -m data.simple --input corpus/ notes.md --output .data/mine --tokenizer tokenizer.json

writes DIR/train.bin and DIR/val.bin (little-endian uint16 when the vocabulary fits, else uint32) and, last,
DIR/meta.json (tokenizer identity, dtype, token/document counts, sha256 of each .bin, the command).

Validation split: document i (in input order, skipped files not counted) goes to val when
floor((i+1)·f) > floor(i·f), i.e. every (1/f)-th document; if that picks none, the last document does.
The rule only looks at the index, so a larger --max-bytes keeps the same val documents.

Read:

    loader = Loader(".data/stdlib", seq_len=256, micro_batch=8, dp_rank=r, dp_size=n, seed=0)
    inputs, labels = next(loader)                 # [micro_batch, seq_len] int64 each
    state = loader.state_dict()                   # JSON-able; Loader(...).load_state_dict(state) resumes exactly

Windows are seq_len+1 tokens at stride seq_len (consecutive windows share one boundary token), so every token
after the first is a label exactly once per epoch. Global sample g of the stream is window perm_e[g mod W]
with e = g div W and perm_e a PCG64 permutation seeded by (seed, e). Rank r of a step takes global samples
consumed + r·micro_batch + i; every rank then advances consumed by dp_size·micro_batch, so the ranks agree
without communicating, and the state (consumed) does not depend on dp_size: a run may resume on another dp.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import sysconfig
import time

import numpy as np
import torch

from data.tokenizer import load_tokenizer

FORMAT = "simple-tokens-v1"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Standard-library directories that are not library source: tests are huge and repetitive, site-packages is not stdlib.
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def token_dtype(vocab_size: int) -> str:
    """Smallest dtype name in DTYPES that holds every id below `vocab_size`."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


# ---------------------------------------------------------------------------------------------------- prepare


def _walk(root: str, suffix: str, skip_dirs: set[str]):
    """Files under `root` in sorted order (deterministic on every file system); hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(suffix) and not name.startswith("."):
                yield os.path.join(dirpath, name)


def _input_files(inputs: list[str]):
    for inp in inputs:
        if inp == "stdlib":
            yield from _walk(sysconfig.get_paths()["stdlib"], ".py", STDLIB_SKIP_DIRS)
        elif os.path.isdir(inp):
            yield from _walk(inp, "", {"__pycache__"})
        else:
            yield inp


def _read_text(path: str) -> tuple[str | None, int, str | None]:
    """(text, bytes read, skip reason): NUL bytes or invalid UTF-8 mean binary."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None, 0, "unreadable"
    if not raw:
        return None, 0, "empty"
    if b"\0" in raw:
        return None, len(raw), "binary"
    try:
        return raw.decode("utf-8"), len(raw), None
    except UnicodeDecodeError:
        return None, len(raw), "binary"


def _is_val(i: int, fraction: float) -> bool:
    return int((i + 1) * fraction) > int(i * fraction)


class _SplitWriter:
    """Appends token arrays to a hidden temp file beside the destination, hashing as it goes."""

    def __init__(self, out_dir: str, split: str, dtype: str):
        self.split, self.dtype = split, DTYPES[dtype]
        # A plain open (not mkstemp) so the published file gets the usual umask permissions, not 0600.
        self.tmp = os.path.join(out_dir, f".{split}.bin.{os.getpid()}.tmp")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.tokens = self.documents = 0

    def append(self, ids: np.ndarray, documents: int = 1):
        raw = ids.astype(self.dtype, copy=False).tobytes()
        self.f.write(raw)
        self.sha.update(raw)
        self.tokens += len(ids)
        self.documents += documents

    def finish(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"file": f"{self.split}.bin", "tokens": self.tokens, "documents": self.documents,
                "sha256": self.sha.hexdigest()}

    def discard(self):
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def _write_json_atomic(path: str, obj: dict):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _publish(out_dir: str, writers: dict[str, _SplitWriter], meta: dict) -> dict:
    """Move finished .bin files into place, then write meta.json: a directory with meta.json is complete."""
    meta["splits"] = {s: w.finish() for s, w in writers.items()}
    meta_path = os.path.join(out_dir, "meta.json")
    # A stale meta.json must never describe new .bin files if we die between the renames below.
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for s, w in writers.items():
        os.replace(w.tmp, os.path.join(out_dir, f"{s}.bin"))
    _write_json_atomic(meta_path, meta)
    return meta


def write_token_dir(out_dir: str, splits: dict[str, np.ndarray], tokenizer_identity: dict, **extra) -> dict:
    """Write already-tokenized arrays as a prepared directory (converters, tests); documents = EOS count."""
    os.makedirs(out_dir, exist_ok=True)
    dtype = token_dtype(tokenizer_identity["vocab_size"])
    writers = {s: _SplitWriter(out_dir, s, dtype) for s in splits}
    try:
        for s, ids in splits.items():
            ids = np.asarray(ids)
            writers[s].append(ids, documents=int((ids == tokenizer_identity["eos_id"]).sum()))
        meta = {"format": FORMAT, "tokenizer": tokenizer_identity, "dtype": dtype, **extra}
        return _publish(out_dir, writers, meta)
    except BaseException:
        for w in writers.values():
            w.discard()
        raise


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, at most every few seconds in a log file."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream is not None and stream.isatty()
        self.interval = 0.5 if self.tty else 5.0
        self.t0 = self.last = time.monotonic()

    def update(self, files: int, nbytes: int, skipped: int, final: bool = False):
        now = time.monotonic()
        if self.stream is None or (not final and now - self.last < self.interval):
            return
        self.last = now
        mb = nbytes / 1e6
        line = f"prepare: {files} files, {mb:.1f} MB, {mb / max(now - self.t0, 1e-6):.1f} MB/s, {skipped} skipped"
        self.stream.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        self.stream.flush()


def _command(inputs, output, tokenizer, eos_token, val_fraction, max_bytes) -> str:
    cmd = ["python", "-m", "data.simple", "--input", *map(str, inputs), "--output", str(output), "--tokenizer", tokenizer]
    cmd += ["--eos-token", eos_token] if eos_token else []
    cmd += ["--val-fraction", str(val_fraction)]
    cmd += ["--max-bytes", str(max_bytes)] if max_bytes else []
    return shlex.join(cmd)


def prepare(inputs: list[str], output: str, tokenizer="byte", *, eos_token: str | None = None,
            val_fraction: float = 0.005, max_bytes: int | None = None, quiet: bool = False) -> dict:
    """Tokenize `inputs` into `output`/{train,val}.bin + meta.json; returns the meta dict.

    `tokenizer` is a spec for `load_tokenizer` or an object with encode/vocab_size/eos_id/identity/name.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"--max-bytes must be positive, got {max_bytes}")
    for inp in inputs:
        if inp != "stdlib" and not os.path.exists(inp):
            raise FileNotFoundError(f"input {inp!r} does not exist; give text files, directories, or 'stdlib'")
    tok = load_tokenizer(tokenizer, eos_token) if isinstance(tokenizer, str) else tokenizer
    dtype = token_dtype(tok.vocab_size)
    os.makedirs(output, exist_ok=True)

    skipped = {"unreadable": 0, "binary": 0, "empty": 0}
    files = nbytes = docs = 0
    progress = _Progress(None if quiet else sys.stderr)
    writers = {s: _SplitWriter(output, s, dtype) for s in SPLITS}
    try:
        # Hold one document back so that, at the end, it can go to val if the rule picked none.
        pending = None
        for path in _input_files(inputs):
            if max_bytes is not None and nbytes >= max_bytes:
                break
            text, size, reason = _read_text(path)
            files += 1
            nbytes += size
            if reason:
                skipped[reason] += 1
            else:
                ids = np.asarray(tok.encode(text) + [tok.eos_id], dtype=DTYPES[dtype])
                if pending is not None:
                    writers[pending[0]].append(pending[1])
                pending = ("val" if _is_val(docs, val_fraction) else "train", ids)
                docs += 1
            progress.update(files, nbytes, sum(skipped.values()))
        if pending is not None:
            split, ids = pending
            if val_fraction > 0 and writers["val"].documents == 0 and writers["train"].documents > 0:
                split = "val"
            writers[split].append(ids)
        progress.update(files, nbytes, sum(skipped.values()), final=True)
        if docs == 0:
            raise ValueError(f"no text documents found in {inputs} ({files} files looked at, skipped: {skipped})")
        meta = {
            "format": FORMAT,
            "tokenizer": tok.identity,
            "dtype": dtype,
            "documents": docs,
            "bytes": nbytes,
            "files_skipped": skipped,
            "val_fraction": val_fraction,
            "max_bytes": max_bytes,
            "inputs": list(inputs),
            "command": _command(inputs, output, tokenizer if isinstance(tokenizer, str) else tok.name,
                                eos_token, val_fraction, max_bytes),
        }
        return _publish(output, writers, meta)
    except BaseException:
        for w in writers.values():
            w.discard()
        raise


# ---------------------------------------------------------------------------------------------------- read


def read_meta(path: str) -> dict:
    """meta.json of a prepared directory, with an error that says how to make one."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{meta_path} not found: {path!r} is not a prepared token directory (or its prepare was interrupted); "
            f"create it with `python -m data.simple --input stdlib --output {path}`")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); re-run `python -m data.simple` for {path!r}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}; re-run prepare")
    return meta


class TokenFile:
    """One split of a prepared directory as a read-only memory map, checked against meta.json."""

    def __init__(self, path: str, split: str = "train"):
        self.dir, self.split = str(path), split
        self.meta = read_meta(self.dir)
        info = self.meta.get("splits", {}).get(split)
        if info is None:
            raise ValueError(f"{self.dir}/meta.json has no split {split!r}; it has {sorted(self.meta.get('splits', {}))}")
        dtype = self.meta.get("dtype")
        if dtype not in DTYPES:
            raise ValueError(f"{self.dir}/meta.json: unknown dtype {dtype!r}, expected one of {sorted(DTYPES)}; "
                             "re-run prepare with this version of data.simple")
        self.dtype = DTYPES[dtype]
        self.bin_path = os.path.join(self.dir, info["file"])
        if not os.path.isfile(self.bin_path):
            raise FileNotFoundError(f"{self.bin_path} is missing but meta.json lists it; re-run prepare for {self.dir!r}")
        expected, actual = info["tokens"] * self.dtype.itemsize, os.path.getsize(self.bin_path)
        if actual != expected:
            raise ValueError(
                f"{self.bin_path} is {actual} bytes but meta.json records {info['tokens']} {dtype} tokens "
                f"({expected} bytes): the file is truncated or from another prepare; re-run prepare for {self.dir!r}")
        self.sha256 = info["sha256"]
        # np.memmap cannot map an empty file.
        self.tokens = np.memmap(self.bin_path, self.dtype, mode="r") if expected else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.tokens)


def _meta_of(meta_or_dir) -> tuple[dict, str]:
    if isinstance(meta_or_dir, dict):
        return meta_or_dir, "the data"
    return read_meta(meta_or_dir), repr(str(meta_or_dir))


def check_vocab(meta_or_dir, vocab_size: int) -> int:
    """Raise if the data's ids do not fit a model with `vocab_size` embedding rows; returns the data's vocab."""
    meta, where = _meta_of(meta_or_dir)
    need = meta["tokenizer"]["vocab_size"]
    if need > vocab_size:
        raise ValueError(
            f"{where} was tokenized with a {need}-token vocabulary ({meta['tokenizer']['kind']}) but the model has "
            f"vocab_size={vocab_size}; set model.vocab_size to at least {need} (e.g. --model.vocab_size={need})")
    return need


def check_tokenizer(meta_or_dir, tokenizer) -> None:
    """Raise if `tokenizer` (a spec or object) is not the one the data was prepared with."""
    meta, where = _meta_of(meta_or_dir)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if tok.identity != meta["tokenizer"]:
        raise ValueError(
            f"{where} was prepared with tokenizer {meta['tokenizer']} but data.tokenizer gives {tok.identity}; "
            "set data.tokenizer to the tokenizer used at prepare time (see meta.json) or re-run prepare")


def _check_layout(seq_len: int, micro_batch: int, dp_rank: int, dp_size: int):
    if seq_len < 1 or micro_batch < 1:
        raise ValueError(f"seq_len and micro_batch must be >= 1, got seq_len={seq_len}, micro_batch={micro_batch}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")


class _Windows:
    """Windows of seq_len+1 tokens at stride seq_len over one split."""

    def __init__(self, path: str, split: str, seq_len: int):
        self.file = TokenFile(path, split)
        self.seq_len = seq_len
        self.count = max(len(self.file) - 1, 0) // seq_len
        if self.count == 0:
            raise ValueError(
                f"{self.file.bin_path} has {len(self.file)} tokens, fewer than seq_len+1 = {seq_len + 1}: prepare more "
                "text (raise --max-bytes, or --val-fraction for val) or lower seq_len")

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = idx[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # [B, seq_len+1]
        rows = torch.from_numpy(self.file.tokens[offsets].astype(np.int64))  # [B, seq_len+1]
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # [B, seq_len] each


class Loader:
    """Infinite, shuffled, per-rank training batches whose whole state is the number of consumed global samples."""

    def __init__(self, path: str, split: str = "train", *, seq_len: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        _check_layout(seq_len, micro_batch, dp_rank, dp_size)
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's PCG64), got {seed}")
        self._windows = _Windows(path, split, seq_len)
        self.split, self.seq_len, self.micro_batch = split, seq_len, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed = 0
        self._perm_epoch, self._perm = -1, None

    @property
    def num_windows(self) -> int:
        return self._windows.count

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_windows

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of `epoch`; PCG64 from numpy's Generator is the same on every platform."""
        if epoch != self._perm_epoch:
            self._perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_indices(self, start: int, count: int) -> np.ndarray:
        """Windows of global samples start .. start+count-1 (which may span epochs)."""
        g = np.arange(start, start + count)
        epochs = g // self.num_windows
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self.permutation(int(e))[g[mask] % self.num_windows]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.window_indices(self.consumed + self.dp_rank * self.micro_batch, self.micro_batch)
        self.consumed += self.dp_size * self.micro_batch
        return self._windows.batch(idx)  # inputs, labels: [micro_batch, seq_len] each

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "data_sha256": self._windows.file.sha256}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key, hint in (("seed", "train.seed"), ("seq_len", "model.seq_len"), ("split", "the split")):
            if state[key] != mine[key]:
                raise ValueError(f"data loader state was saved with {key}={state[key]!r} but this run has "
                                 f"{key}={mine[key]!r}; set {hint} back to {state[key]!r} to resume exactly")
        if state["data_sha256"] != mine["data_sha256"]:
            raise ValueError(f"data loader state was saved on different data ({self._windows.file.bin_path} changed "
                             "since); point data.path at the original directory to resume exactly")
        self.consumed = int(state["consumed"])


class ValLoader:
    """Fixed validation batches: global batch j is windows [j·G, (j+1)·G) in file order (G = dp_size·micro_batch),
    of which rank r takes its micro_batch slice. Stateless, so every call yields the same batches."""

    def __init__(self, path: str, split: str = "val", *, seq_len: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1):
        _check_layout(seq_len, micro_batch, dp_rank, dp_size)
        self._windows = _Windows(path, split, seq_len)
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.num_batches = self._windows.count // (dp_size * micro_batch)
        if self.num_batches == 0:
            raise ValueError(
                f"{self._windows.file.bin_path} has {self._windows.count} windows of {seq_len + 1} tokens, fewer than "
                f"one global batch (dp_size*micro_batch = {dp_size * micro_batch}); raise --val-fraction at prepare "
                "or lower micro_batch / seq_len")

    def batches(self, n: int):
        """The first min(n, num_batches) batches of this rank; identical on every call."""
        global_batch = self.dp_size * self.micro_batch
        for j in range(min(n, self.num_batches)):
            start = j * global_batch + self.dp_rank * self.micro_batch
            yield self._windows.batch(np.arange(start, start + self.micro_batch))


# ---------------------------------------------------------------------------------------------------- CLI


def _size(text: str) -> int:
    """'4M' → 4_000_000 (decimal K/M/G, like the MB in the progress line)."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    text = text.strip().upper()
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count like 4000000 or 4M, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m data.simple",
        description="Tokenize text files into DIR/train.bin, DIR/val.bin and DIR/meta.json for pretrain.train "
                    "(one document per file, EOS after each). Nothing is downloaded.",
        epilog="example: python -m data.simple --input stdlib --output .data/stdlib --max-bytes 4M")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files, directories (walked recursively in sorted order; hidden entries and binary or "
                        "unreadable files skipped and counted), or 'stdlib': this interpreter's standard-library *.py "
                        "files without tests and site-packages")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="directory for train.bin, val.bin, meta.json (created if missing; replaced atomically)")
    p.add_argument("--tokenizer", default="byte", metavar="byte|FILE",
                   help="'byte' (UTF-8 bytes, vocab 257, EOS 256; the default) or a local Hugging Face "
                        "tokenizer.json (or a directory holding one)")
    p.add_argument("--eos-token", metavar="TOKEN",
                   help="end-of-document token of a tokenizer.json (default: the first of "
                        "<|endoftext|>, </s>, <eos>, <|end_of_text|> that it has)")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="fraction of documents for val.bin: document i goes to val when floor((i+1)F) > floor(iF), "
                        "or the last document if that picks none (default: 0.005; 0 = empty val.bin)")
    p.add_argument("--max-bytes", type=_size, default=None, metavar="N",
                   help="stop reading files once N bytes of input are read (K/M/G suffixes, e.g. 4M); documents "
                        "stay whole, so the last one may cross N (default: no cap)")
    args = p.parse_args(argv)
    try:
        meta = prepare(args.input, args.output, args.tokenizer, eos_token=args.eos_token,
                       val_fraction=args.val_fraction, max_bytes=args.max_bytes)
    except (OSError, ValueError) as e:
        sys.exit(f"data.simple: error: {e}")
    s = meta["splits"]
    print(f"wrote {args.output}: {meta['documents']} documents, train {s['train']['tokens']} tokens, "
          f"val {s['val']['tokens']} tokens ({meta['dtype']}, tokenizer {meta['tokenizer']['kind']})", file=sys.stderr)


if __name__ == "__main__":
    main()
