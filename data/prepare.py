"""Tokenize text (or convert Megatron datasets) into webdataset shards plus a manifest, resumably and in parallel.

    python -m data.prepare --input corpus/ web.jsonl.zst --output .data/mine --tokenizer tokenizer.json --workers 8
    python -m data.prepare --input stdlib --output .data/stdlib --max-bytes 6M --val-fraction 0.02

Writes DIR/train-NNNNNN.tar, DIR/val-NNNNNN.tar (format in data/shards.py) and, last, DIR/manifest.json.

Determinism: the main process reads documents in input order (data/sources.py) and writes every shard; worker
processes only tokenize batches, and results are written in submission order, so the bytes do not depend on
--workers. Document g (0-based, in input order, skipped files not counted) goes to val when
ceil((g+1)·F) > ceil(g·F): document 0, then every (1/F)-th, so the first g documents hold ⌈g·F⌉ val ones.

Resume: after each shard is published, a line appended to DIR/.prepare-journal.jsonl records it (with its
sha256) and the input position after its last document. A re-run with the same inputs and options keeps the
shards whose checksums still match and continues from there; documents before that position are read again but
not tokenized. A complete output (manifest.json, every shard intact) is left as it is.

Other people's files: prepare writes only into a directory that is empty, missing, or its own (it holds prepare's
journal or manifest); a directory holding anything else, or a dataset prepared with other options or inputs, is
refused unless --overwrite (which replaces or deletes only files named like shards). An earlier manifest is
removed only just before the first shard is replaced (its shards were damaged and are being repaired, or under
--overwrite): a run that fails before that leaves the earlier dataset whole.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import re
import shlex
import sys
import time
from fractions import Fraction

import numpy as np

from data.shards import (DTYPES, MANIFEST, ShardWriter, new_manifest, shard_name, split_entry, token_dtype,
                         write_json_atomic)
from data.sources import Input, Reader, expand_inputs
from data.tokenizer import load_tokenizer

JOURNAL = ".prepare-journal.jsonl"  # first line: the options; then one line per published shard
SPLITS = ("train", "val")
DEFAULT_SHARD_SIZE = 256 * 10**6
BATCH_BYTES = 1 << 20  # text per task sent to a worker: large enough to amortise pickling, small enough to balance
_SHARD_FILE = re.compile(r"^(?:train|val)-\d{6}\.tar$|^\.(?:train|val)-\d{6}\.tar\.\d+\.tmp$")


class ValRule:
    """Document g is val when ceil((g+1)·F) > ceil(g·F), computed exactly (F as a fraction)."""

    def __init__(self, fraction: float):
        f = Fraction(fraction).limit_denominator(10**9)
        self.p, self.q = f.numerator, f.denominator

    def __call__(self, g: int) -> bool:
        return -(-(g + 1) * self.p // self.q) > -(-g * self.p // self.q)


class Encoder:
    """Token ids (EOS appended) for a batch of documents: text is tokenized, Megatron arrays pass through."""

    def __init__(self, tokenizer: str, eos_token: str | None):
        self.tok = load_tokenizer(tokenizer, eos_token)
        self.dtype = DTYPES[token_dtype(self.tok.vocab_size)]
        self.byte = self.tok.identity["kind"] == "byte"

    def __call__(self, docs: list) -> list[np.ndarray]:
        texts = [d for d in docs if isinstance(d, str)]
        if self.byte:
            encoded = iter([np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts])
        elif hasattr(self.tok, "encode_batch"):
            encoded = iter(self.tok.encode_batch(texts))
        else:
            encoded = iter([self.tok.encode(t) for t in texts])
        out = []
        for d in docs:
            if isinstance(d, str):
                ids = next(encoded)
                arr = np.empty(len(ids) + 1, self.dtype)
                arr[:-1] = ids
                arr[-1] = self.tok.eos_id
                out.append(arr)
            else:
                out.append(d)
        return out


_WORKER_ENCODER: Encoder | None = None


def _init_worker(tokenizer: str, eos_token: str | None):
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the processes are the parallelism
    _WORKER_ENCODER = Encoder(tokenizer, eos_token)


def _encode_in_worker(docs: list) -> list[np.ndarray]:
    return _WORKER_ENCODER(docs)


class _Ready:
    """A finished result with the AsyncResult interface, for batches that need no tokenizing."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Progress:
    """One status line on stderr (documents, MB/s, ETA): rewritten in place on a terminal, every 5 s in a log."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream is not None and stream.isatty()
        self.interval = 0.5 if self.tty else 5.0
        self.t0 = self.last = time.monotonic()

    def update(self, docs: int, text_bytes: int, done_fraction: float, final: bool = False):
        now = time.monotonic()
        if self.stream is None or (not final and now - self.last < self.interval):
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-6)
        eta = elapsed * (1 - done_fraction) / done_fraction if 0 < done_fraction < 1 else 0.0
        line = (f"prepare: {docs} documents, {text_bytes / 1e6:.1f} MB, {text_bytes / 1e6 / elapsed:.1f} MB/s, "
                f"{100 * min(done_fraction, 1):.0f}%, ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        self.stream.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        self.stream.flush()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _intact(out_dir: str, entry: dict) -> bool:
    path = os.path.join(out_dir, entry["name"])
    return os.path.isfile(path) and os.path.getsize(path) == entry["bytes"] and _sha256_file(path) == entry["sha256"]


def _read_journal(path: str, config: dict) -> list[tuple[str, dict]]:
    """(split, shard entry) lines of a journal written with `config`; none if absent or from other options."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    try:
        if json.loads(lines[0]) != config:
            return []
    except json.JSONDecodeError:
        return []
    entries = []
    for line in filter(None, lines[1:]):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: keep what precedes it
            break
    return [(e.pop("split"), e) for e in entries]


def _write_journal(path: str, config: dict, done: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(config) + "\n")
        f.writelines(json.dumps({"split": s, **e}) + "\n" for s in SPLITS for e in done[s])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _command(inputs, output, tokenizer, *, eos_token, shard_size, val_fraction, text_key, max_bytes) -> str:
    # --workers, --quiet and --overwrite are left out: they do not change a byte of the output.
    cmd = ["python", "-m", "data.prepare", "--input", *map(str, inputs), "--output", str(output),
           "--tokenizer", tokenizer, "--shard-size", str(shard_size), "--val-fraction", str(val_fraction),
           "--text-key", text_key]
    cmd += ["--eos-token", eos_token] if eos_token else []
    cmd += ["--max-bytes", str(max_bytes)] if max_bytes else []
    return shlex.join(cmd)


def _own_manifest(path: str) -> dict | None:
    """The manifest at `path` if data.prepare wrote it (it records the prepare options), else None."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "prepare" in manifest else None


def _differences(old: dict, new: dict) -> str:
    """'shard_size 2000 → 5000, the input files' for two prepare configs."""
    out = []
    for key in new:
        if old.get(key) != new[key]:
            out.append("the input files (names or sizes)" if key == "inputs_sha256" else
                       f"{key} {old.get(key)} → {new[key]}")
    return ", ".join(out)


def _check_output(output: str, config: dict, *, overwrite: bool) -> dict | None:
    """Refuse to write where prepare would overwrite files it did not write; returns the manifest already there
    when it is this very dataset, complete and intact (nothing to do). Any other manifest stays until prepare first
    changes a shard (`_retire_manifest`), so a run that fails before that leaves the old dataset whole."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"--output {output} is a file, not a directory; give a directory for the shards")
    entries = sorted(os.listdir(output)) if os.path.isdir(output) else []
    manifest_path = os.path.join(output, MANIFEST)
    old = _own_manifest(manifest_path)
    if entries and old is None and JOURNAL not in entries and not overwrite:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise FileExistsError(
            f"--output {output} already holds files that data.prepare did not write ({shown}); choose a new or "
            "empty directory, or pass --overwrite to write the dataset there anyway (files named like its shards, "
            "train-NNNNNN.tar and val-NNNNNN.tar, are then replaced or deleted, and manifest.json replaced; other "
            "files are left alone)")
    if old is None:
        return None
    if old["prepare"] == config:
        if all(_intact(output, s) for sp in old["splits"].values() for s in sp["shards"]):
            return old
    elif not overwrite:
        changed = _differences(old["prepare"], config)
        raise FileExistsError(
            f"--output {output} holds a dataset prepared with other options or inputs ({changed}; it was made by: "
            f"{old.get('command', '?')}); pass --overwrite to replace it, or choose another --output")
    return None


def _retire_manifest(path: str) -> None:
    """Remove an earlier manifest just before a shard it may describe is replaced or deleted: a manifest never
    describes other files, and until then it stays (a run that fails early loses nothing)."""
    if os.path.exists(path):
        os.remove(path)


def _start_position() -> dict:
    return {"input": 0, "item": 0, "doc": 0, "bytes": 0, "skipped": {"unreadable": 0, "binary": 0, "empty": 0}}


def prepare(inputs: list[str], output: str, tokenizer: str = "byte", *, workers: int = 1,
            shard_size: int = DEFAULT_SHARD_SIZE, val_fraction: float = 0.005, text_key: str = "text",
            eos_token: str | None = None, max_bytes: int | None = None, quiet: bool = False,
            overwrite: bool = False) -> dict:
    """Tokenize `inputs` into shards under `output`; returns the manifest (also written to output/manifest.json).

    `overwrite`: write into a directory holding files prepare did not write, or a dataset made with other options.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_size <= 0 or (max_bytes is not None and max_bytes <= 0) or workers < 1:
        raise ValueError(f"--shard-size, --max-bytes and --workers must be positive, got {shard_size}, "
                         f"{max_bytes}, {workers}")
    output = str(output)
    items, not_regular = expand_inputs(inputs, exclude=output)
    if not_regular:
        shown = ", ".join(not_regular[:5]) + (f" and {len(not_regular) - 5} more" if len(not_regular) > 5 else "")
        print(f"data.prepare: warning: skipped {len(not_regular)} input path(s) that are not regular files (FIFOs, "
              f"sockets, devices or broken links): {shown}", file=sys.stderr)
    encoder = Encoder(tokenizer, eos_token)
    tok, dtype = encoder.tok, token_dtype(encoder.tok.vocab_size)
    listing = [[i.path, i.kind, i.size] for i in items]
    config = {"tokenizer": tok.identity, "dtype": dtype, "shard_size": shard_size, "val_fraction": val_fraction,
              "text_key": text_key, "max_bytes": max_bytes,
              "inputs_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    command = _command(inputs, output, tokenizer, eos_token=eos_token, shard_size=shard_size,
                       val_fraction=val_fraction, text_key=text_key, max_bytes=max_bytes)
    progress = _Progress(None if quiet else sys.stderr)

    manifest_path, journal_path = os.path.join(output, MANIFEST), os.path.join(output, JOURNAL)
    complete = _check_output(output, config, overwrite=overwrite)
    if complete is not None:
        progress.update(complete["documents"], complete["input_bytes"], 1.0, final=True)
        return complete
    os.makedirs(output, exist_ok=True)

    # Keep the journal's shards whose checksums still hold; each split resumes after its last intact shard.
    done = {s: [] for s in SPLITS}
    for s, entry in _read_journal(journal_path, config):
        if len(done[s]) == int(entry["name"][-10:-4]) and _intact(output, entry):
            done[s].append(entry)
    _write_journal(journal_path, config, done)
    resume = {s: done[s][-1]["next"] if done[s] else _start_position() for s in SPLITS}
    pos = min(resume.values(), key=lambda p: p["doc"])
    resumed_docs = {s: resume[s]["doc"] for s in SPLITS}

    is_val = ValRule(val_fraction)
    writers: dict[str, ShardWriter | None] = {s: None for s in SPLITS}
    pool = multiprocessing.get_context().Pool(workers, _init_worker, (tokenizer, eos_token)) if workers > 1 else None
    in_flight: collections.deque = collections.deque()
    docs, text_bytes, skipped = pos["doc"], pos["bytes"], dict(pos["skipped"])
    size_before = np.cumsum([0] + [i.size for i in items]).tolist()
    size_before[-1] = max(size_before[-1], 1)

    def publish(split, after):
        _retire_manifest(manifest_path)
        done[split].append({**writers[split].close(), "next": after})
        writers[split] = None
        with open(journal_path, "a") as f:
            f.write(json.dumps({"split": split, **done[split][-1]}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write(batch_meta, result):
        for (g, split, after), ids in zip(batch_meta, result.get()):
            if writers[split] is None:
                writers[split] = ShardWriter(output, shard_name(split, len(done[split])), dtype)
            writers[split].add(g, ids)
            if writers[split].bytes >= shard_size:
                publish(split, after)

    def submit(meta, payloads):
        if not meta:
            return
        ready = all(not isinstance(p, str) for p in payloads)
        if ready or pool is None:
            in_flight.append((meta, _Ready(encoder(payloads))))
        else:
            in_flight.append((meta, pool.apply_async(_encode_in_worker, (payloads,))))
        while in_flight and (len(in_flight) > 2 * workers or isinstance(in_flight[0][1], _Ready)):
            write(*in_flight.popleft())

    try:
        meta, payloads, pending_bytes = [], [], 0
        stop = False
        for i in range(pos["input"], len(items)):
            reader = Reader(items[i], text_key=text_key, skip=pos["item"] if i == pos["input"] else 0)
            for doc, reason, nbytes in reader:
                if max_bytes is not None and text_bytes >= max_bytes:
                    stop = True
                    break
                if reason is None and not isinstance(doc, str):
                    doc = _megatron_ids(doc, items[i], reader.position - 1, encoder)
                    reason = None if len(doc) else "empty"
                if reason is not None:
                    skipped[reason] += 1
                    continue
                g, split = docs, "val" if is_val(docs) else "train"
                docs += 1
                text_bytes += nbytes
                if g >= resumed_docs[split]:
                    after = {"input": i, "item": reader.position, "doc": docs, "bytes": text_bytes,
                             "skipped": dict(skipped)}
                    meta.append((g, split, after))
                    payloads.append(doc)
                    pending_bytes += nbytes
                if pending_bytes >= BATCH_BYTES:
                    submit(meta, payloads)
                    meta, payloads, pending_bytes = [], [], 0
                done_files = (size_before[i] + reader.file_pos) / size_before[-1]
                progress.update(docs, text_bytes, max(done_files, text_bytes / max_bytes if max_bytes else 0))
            if stop:
                break
        submit(meta, payloads)
        while in_flight:
            write(*in_flight.popleft())
        # A split's last shard resumes at the end of the input: a re-run finds nothing more for that split.
        end = {"input": len(items), "item": 0, "doc": docs, "bytes": text_bytes, "skipped": dict(skipped)}
        for s in SPLITS:
            if writers[s] is not None:
                publish(s, end)
    except BaseException:
        for w in writers.values():
            if w is not None:
                w.discard()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    progress.update(docs, text_bytes, 1.0, final=True)
    if not done["train"]:
        raise ValueError(f"no training documents in {inputs} ({docs} documents, skipped: {skipped}, not regular "
                         f"files: {len(not_regular)}); give more text or lower --val-fraction")

    manifest = new_manifest(tok.identity, dtype)
    manifest["splits"] = {s: split_entry([{k: v for k, v in e.items() if k != "next"} for e in done[s]])
                          for s in SPLITS}
    manifest.update(documents=docs, input_bytes=text_bytes, skipped={**skipped, "not_regular": len(not_regular)},
                    val_fraction=val_fraction,
                    inputs=[str(i) for i in inputs], command=command, prepare=config)
    keep = {e["name"] for s in SPLITS for e in done[s]}
    _retire_manifest(manifest_path)
    for name in os.listdir(output):
        if _SHARD_FILE.match(name) and name not in keep:
            os.remove(os.path.join(output, name))  # shards of an earlier, larger prepare or a killed one
    write_json_atomic(manifest_path, manifest)
    return manifest


def _megatron_ids(ids: np.ndarray, item: Input, d: int, encoder: Encoder) -> np.ndarray:
    """A Megatron document as our dtype, EOS appended unless it already ends with one (Megatron's --append-eod)."""
    tok = encoder.tok
    if len(ids) and (ids.min() < 0 or ids.max() >= tok.vocab_size):
        raise ValueError(f"{item.path}.bin document {d} has token id {int(ids.max())} (or negative) outside the "
                         f"{tok.vocab_size}-token vocabulary of {tok.name}; pass the tokenizer the dataset was "
                         "made with (--tokenizer)")
    if len(ids) == 0:
        return ids
    if ids[-1] != tok.eos_id:
        ids = np.append(ids, tok.eos_id)
    return ids.astype(encoder.dtype)


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
        prog="python -m data.prepare",
        description="Tokenize documents into webdataset shards DIR/{train,val}-NNNNNN.tar plus DIR/manifest.json for "
                    "pretrain.train (EOS after each document). Nothing is downloaded. Re-running the same command "
                    "keeps complete shards (checked by sha256) and continues a killed run.",
        epilog="example: python -m data.prepare --input stdlib --output .data/stdlib --max-bytes 6M")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories (walked recursively in sorted order, hidden entries skipped), globs, "
                        "or 'stdlib' (this interpreter's standard-library *.py files). *.jsonl, *.jsonl.gz, "
                        "*.jsonl.zst: one document per line (field --text-key); *.parquet: one per row (column "
                        "--text-key); PREFIX.bin/.idx or PREFIX: a Megatron-LM indexed dataset (one per document, "
                        "already tokenized); any other file: one document, UTF-8 text (binary files skipped, counted). "
                        "Regular files only: FIFOs, sockets and devices in directories are skipped and counted")
    p.add_argument("--output", required=True, metavar="DIR", help="directory for the shards and manifest.json "
                   "(created if missing; never read as input). It must be empty or prepare's own")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --output even though it holds files prepare did not write, or a dataset made "
                        "with other options or inputs: files named like shards are replaced or deleted, others kept")
    p.add_argument("--tokenizer", default="byte", metavar="byte|FILE",
                   help="'byte' (UTF-8 bytes, vocab 257, EOS 256; the default), a local Hugging Face tokenizer.json "
                        "(or a directory holding one) or a local .tiktoken BPE file. For a Megatron input, the "
                        "tokenizer its ids came from")
    p.add_argument("--eos-token", metavar="TOKEN",
                   help="end-of-document token of a tokenizer file (default: the first of <|endoftext|>, </s>, "
                        "<eos>, <|end_of_text|> it has)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="tokenizer processes (default: the number of CPUs, %(default)s here); the output is the "
                        "same for any N")
    p.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_SIZE, metavar="BYTES",
                   help="close a shard once it reaches this size (K/M/G suffixes; documents are never split; "
                        "default 256M)")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="fraction of documents carved off into val shards: document g when ceil((g+1)F) > ceil(gF) "
                        "(document 0, then every 1/F-th; default 0.005; 0 = no val split)")
    p.add_argument("--text-key", default="text", metavar="KEY",
                   help="JSON field / parquet column holding the text (default: text)")
    p.add_argument("--max-bytes", type=_size, default=None, metavar="N",
                   help="stop once N bytes of text are read (K/M/G suffixes); documents stay whole (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    try:
        m = prepare(args.input, args.output, args.tokenizer, workers=args.workers, shard_size=args.shard_size,
                    val_fraction=args.val_fraction, text_key=args.text_key, eos_token=args.eos_token,
                    max_bytes=args.max_bytes, quiet=args.quiet, overwrite=args.overwrite)
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"data.prepare: error: {e}")
    s = m["splits"]
    print(f"wrote {args.output}: {m['documents']} documents; train {s['train']['tokens']} tokens in "
          f"{len(s['train']['shards'])} shards, val {s['val']['tokens']} tokens in {len(s['val']['shards'])} shards "
          f"({m['dtype']}, tokenizer {m['tokenizer']['kind']}, vocab {m['tokenizer']['vocab_size']})", file=sys.stderr)


if __name__ == "__main__":
    main()
