"""Inputs of `data.prepare`: which files, in which order, and the documents each one holds.

Kinds (by name): `*.jsonl`, `*.jsonl.gz`, `*.jsonl.zst` (and `.ndjson`): one JSON object per line, the document is
its `text_key` field; `*.parquet`: one document per row of column `text_key`; a Megatron-LM indexed dataset
(`PREFIX.bin` + `PREFIX.idx`, either named): already tokenized, one document per Megatron document (its
sequences concatenated), read through megatron-core's `IndexedDataset`; anything else: one document per file,
UTF-8 text (files with NUL bytes or invalid UTF-8 are skipped and counted as binary, empty files as empty).

Order: inputs in the order given; a directory is walked recursively in sorted order (hidden entries and
`__pycache__` skipped); a glob is expanded and sorted. `stdlib` names this interpreter's standard-library
`*.py` files without tests and site-packages (a real corpus that needs no download).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sysconfig
from dataclasses import dataclass

import numpy as np

# Standard-library directories that are not library source: tests are huge and repetitive, site-packages is not stdlib.
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".ndjson.gz", ".ndjson.zst")


@dataclass(frozen=True)
class Input:
    path: str  # for megatron: the prefix, without .bin/.idx
    kind: str  # text | jsonl | parquet | megatron

    @property
    def size(self) -> int:
        """Bytes on disk (for progress and ETA)."""
        if self.kind == "megatron":
            return os.path.getsize(self.path + ".bin")
        return os.path.getsize(self.path)


def _walk(root: str, suffix: str = "", skip_dirs: frozenset | set = frozenset({"__pycache__"})):
    """Files under `root` in sorted order (deterministic on every file system); hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(suffix) and not name.startswith("."):
                yield os.path.join(dirpath, name)


def _kind(path: str) -> str:
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith((".bin", ".idx")) and os.path.isfile(path[:-4] + ".bin") and os.path.isfile(path[:-4] + ".idx"):
        return "megatron"
    return "text"


def expand_inputs(inputs: list[str]) -> list[Input]:
    """Every input file in prepare order; a Megatron pair appears once however it was named."""
    out, seen = [], set()
    for spec in inputs:
        spec = str(spec)
        if spec == "stdlib":
            paths = list(_walk(sysconfig.get_paths()["stdlib"], ".py", STDLIB_SKIP_DIRS))
        elif os.path.isdir(spec):
            paths = list(_walk(spec))
        elif os.path.isfile(spec):
            paths = [spec]
        elif any(c in spec for c in "*?["):
            paths = []
            for match in sorted(glob.glob(spec, recursive=True)):
                paths += list(_walk(match)) if os.path.isdir(match) else [match]
            if not paths:
                raise FileNotFoundError(f"input glob {spec!r} matches nothing")
        elif os.path.isfile(spec + ".bin") and os.path.isfile(spec + ".idx"):
            paths = [spec + ".idx"]  # a Megatron prefix, as Megatron-LM names its datasets
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist; give files, directories, globs, a Megatron "
                                    "PREFIX (of PREFIX.bin/.idx) or 'stdlib'")
        for path in paths:
            kind = _kind(path)
            item = Input(path[:-4] if kind == "megatron" else path, kind)
            if item not in seen:
                seen.add(item)
                out.append(item)
    return out


class Reader:
    """The documents of one input, from item `skip` on: (document or None, skip reason or None, bytes).

    A document is a str, or for Megatron inputs an integer array of token ids. `position` is the number of items
    (documents and skipped files) taken so far and `file_pos` the bytes of the file read so far (for the ETA).
    """

    def __init__(self, item: Input, *, text_key: str = "text", skip: int = 0):
        self.item, self.text_key, self.skip = item, text_key, skip
        self.position = skip
        self.file_pos = 0

    def __iter__(self):
        items = {"text": self._text, "jsonl": self._jsonl, "parquet": self._parquet, "megatron": self._megatron}
        for item in items[self.item.kind]():
            self.position += 1
            yield item
        self.file_pos = self.item.size

    def _text(self):
        if self.skip:
            return
        try:
            with open(self.item.path, "rb") as f:
                raw = f.read()
        except OSError:
            yield None, "unreadable", 0
            return
        self.file_pos = len(raw)
        if not raw:
            yield None, "empty", 0
        elif b"\0" in raw:
            yield None, "binary", len(raw)
        else:
            try:
                yield raw.decode("utf-8"), None, len(raw)
            except UnicodeDecodeError:
                yield None, "binary", len(raw)

    def _jsonl(self):
        path = self.item.path
        with open(path, "rb") as raw:
            if path.endswith(".gz"):
                f = gzip.open(raw)
            elif path.endswith(".zst"):
                import zstandard

                f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
            else:
                f = raw
            for n, line in enumerate(f, 1):
                self.file_pos = raw.tell()
                if n <= self.skip:
                    continue
                if not line.strip():
                    yield None, "empty", len(line)
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e}); each line must be one JSON object") from None
                if not isinstance(obj, dict) or self.text_key not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ValueError(f"{path}:{n}: no field {self.text_key!r} (found {keys}); "
                                     "name the text field with --text-key")
                text = obj[self.text_key]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: field {self.text_key!r} is {type(text).__name__}, not a string")
                yield (text, None, len(line)) if text else (None, "empty", len(line))

    def _parquet(self):
        import pyarrow.parquet as pq

        f = pq.ParquetFile(self.item.path)
        if self.text_key not in f.schema_arrow.names:
            raise ValueError(f"{self.item.path}: no column {self.text_key!r} (columns {f.schema_arrow.names}); "
                             "name the text column with --text-key")
        size, rows, n = self.item.size, max(f.metadata.num_rows, 1), 0
        for batch in f.iter_batches(columns=[self.text_key], batch_size=1024):
            for text in batch.column(0).to_pylist():
                n += 1
                self.file_pos = size * n // rows
                if n <= self.skip:
                    continue
                if not text:
                    yield None, "empty", 0
                else:
                    yield text, None, len(text.encode("utf-8"))

    def _megatron(self):
        ds = megatron_dataset(self.item.path)
        bounds = ds.document_indices
        per_token = ds.index.dtype().itemsize
        for d in range(self.skip, len(bounds) - 1):
            ids = megatron_document(ds, d)
            self.file_pos += len(ids) * per_token
            yield ids, None, len(ids) * per_token


def megatron_dataset(prefix: str):
    """megatron-core's IndexedDataset for PREFIX.bin/.idx (imported only when such an input is given)."""
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError as e:
        raise ImportError(f"reading the Megatron dataset {prefix!r} needs megatron-core "
                          "(pip install megatron-core)") from e
    return IndexedDataset(prefix)


def megatron_document(ds, d: int) -> np.ndarray:
    """Document `d` of an IndexedDataset: its sequences, concatenated."""
    start, stop = int(ds.document_indices[d]), int(ds.document_indices[d + 1])
    if stop == start:
        return np.zeros(0, ds.index.dtype)
    return np.concatenate(ds[start:stop])
