"""Inputs of `data.prepare`: which files, in which order, and the documents each one holds.

Kinds (by name): `*.jsonl`, `*.jsonl.gz`, `*.jsonl.zst` (and `.ndjson`): one JSON object per line, the document is
its `text_key` field; `*.parquet`: one document per row of column `text_key`; a Megatron-LM indexed dataset
(`PREFIX.bin` + `PREFIX.idx`, either named): already tokenized, one document per Megatron document (its
sequences concatenated), read through megatron-core's `IndexedDataset`; anything else: one document per file,
UTF-8 text (files with NUL bytes or invalid UTF-8 are skipped and counted as binary, empty files as empty).
A `.jsonl` line that is not UTF-8 JSON, a compressed file that does not decompress and a file named `.parquet`
that is not one are errors naming the file (and the line).

Order: inputs in the order given; a directory is walked recursively in sorted order (hidden entries and
`__pycache__` skipped); a glob is expanded and sorted. `stdlib` names this interpreter's standard-library
`*.py` files without tests and site-packages (a real corpus that needs no download).

Only regular files (or links to them) are read: a FIFO would block forever and a device (a link to /dev/zero)
never ends, so those found in directories and globs are left out and listed, and one named directly is an
error. Nothing inside prepare's output directory is ever an input, so an output inside an input directory is
not read back on the next run.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import stat
import sysconfig
import zlib
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


def _inside(path: str, directory: str | None) -> bool:
    """Whether `path` is `directory` (a resolved path) or lies under it, links resolved."""
    if directory is None:
        return False
    return os.path.commonpath([os.path.realpath(path), directory]) == directory


def _walk(root: str, suffix: str = "", skip_dirs: frozenset | set = frozenset({"__pycache__"}),
          exclude: str | None = None):
    """Files under `root` in sorted order (deterministic on every file system); hidden entries and the directory
    `exclude` skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith(".")
                             and not _inside(os.path.join(dirpath, d), exclude))
        for name in sorted(filenames):
            if name.endswith(suffix) and not name.startswith("."):
                yield os.path.join(dirpath, name)


def _is_regular(path: str) -> bool:
    """A regular file, or a link to one (a broken link, FIFO, socket or device is not)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _kind(path: str) -> str:
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith((".bin", ".idx")) and os.path.isfile(path[:-4] + ".bin") and os.path.isfile(path[:-4] + ".idx"):
        return "megatron"
    return "text"


def expand_inputs(inputs: list[str], *, exclude: str | None = None) -> tuple[list[Input], list[str]]:
    """(every input file in prepare order, the paths found that are not regular files and were left out).

    A Megatron pair appears once however it was named. Nothing in the directory `exclude` (prepare's output) is
    an input: naming it, or something inside it, is an error; directories and globs pass over it.
    """
    exclude = os.path.realpath(exclude) if exclude is not None else None
    out, seen, not_regular = [], set(), []
    for spec in inputs:
        spec = str(spec)
        if spec != "stdlib" and os.path.lexists(spec) and _inside(spec, exclude):
            raise ValueError(f"input {spec!r} is inside --output {exclude!r}: prepare never reads its own output; "
                             "give the text files, or write the shards to another --output")
        if spec == "stdlib":
            paths = list(_walk(sysconfig.get_paths()["stdlib"], ".py", STDLIB_SKIP_DIRS))
        elif os.path.isdir(spec):
            paths = list(_walk(spec, exclude=exclude))
        elif os.path.isfile(spec):
            paths = [spec]
        elif os.path.lexists(spec):  # exists, yet neither a directory nor a regular file
            raise ValueError(f"input {spec!r} is not a regular file (a FIFO, socket, device or broken link); "
                             "prepare reads regular files only: copy its contents into a file and give that")
        elif any(c in spec for c in "*?["):
            paths = []
            for match in sorted(glob.glob(spec, recursive=True)):
                if not _inside(match, exclude):
                    paths += list(_walk(match, exclude=exclude)) if os.path.isdir(match) else [match]
            if not paths:
                raise FileNotFoundError(f"input glob {spec!r} matches nothing")
        elif os.path.isfile(spec + ".bin") and os.path.isfile(spec + ".idx"):
            paths = [spec + ".idx"]  # a Megatron prefix, as Megatron-LM names its datasets
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist; give files, directories, globs, a Megatron "
                                    "PREFIX (of PREFIX.bin/.idx) or 'stdlib'")
        for path in paths:
            if not _is_regular(path):
                not_regular.append(path)
                continue
            kind = _kind(path)
            item = Input(path[:-4] if kind == "megatron" else path, kind)
            if item not in seen:
                seen.add(item)
                out.append(item)
    return out, not_regular


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
                f, broken = gzip.open(raw), (OSError, EOFError, zlib.error)
            elif path.endswith(".zst"):
                import zstandard

                f, broken = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), (zstandard.ZstdError,)
            else:
                f, broken = raw, ()
            for n, line in enumerate(_decompressed(f, path, broken), 1):
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
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid UTF-8 (byte {e.object[e.start]:#04x} at byte "
                                     f"{e.start + 1} of the line: {e.reason}); JSON lines must be UTF-8 text, so "
                                     "convert the file (e.g. iconv -f latin1 -t utf-8)") from None
                if not isinstance(obj, dict) or self.text_key not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ValueError(f"{path}:{n}: no field {self.text_key!r} (found {keys}); "
                                     "name the text field with --text-key")
                text = obj[self.text_key]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: field {self.text_key!r} is {type(text).__name__}, not a string")
                yield (text, None, len(line)) if text else (None, "empty", len(line))

    def _parquet(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(self.item.path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{self.item.path}: not a readable Parquet file ({e})") from None
        if self.text_key not in f.schema_arrow.names:
            raise ValueError(f"{self.item.path}: no column {self.text_key!r} (columns {f.schema_arrow.names}); "
                             "name the text column with --text-key")
        size, rows, n = self.item.size, max(f.metadata.num_rows, 1), 0
        batches = f.iter_batches(columns=[self.text_key], batch_size=1024)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{self.item.path}: not a readable Parquet file after row {n} ({e})") from None
            if batch is None:
                break
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


def _decompressed(f, path: str, broken: tuple):
    """The lines of `f`, with the decompressor's errors (types `broken`) as one naming the file and line."""
    n = 0
    try:
        for n, line in enumerate(f, 1):
            yield line
    except broken as e:
        suffix = os.path.splitext(path)[1]
        tool = {".gz": "gzip", ".zst": "zstd"}[suffix]
        after = f" after line {n}" if n else ""
        raise ValueError(f"{path}: not a valid {suffix} file{after} ({e}); check it with `{tool} -t`, or name it "
                         f"without {suffix} if it is not compressed") from None


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
