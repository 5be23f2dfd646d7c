"""The shard format: webdataset tar files of token arrays plus a manifest.json that makes them seekable.

A shard `<split>-NNNNNN.tar` holds one member per document, `<document index>.tokens.u16` (or `.tokens.u32`): the
document's token ids, EOS last, as raw little-endian integers. Plain `tar` lists it and `webdataset.WebDataset`
reads it (sample key = the document index, extension `tokens.u16`; `np.frombuffer(sample["tokens.u16"], "<u2")`).
Headers are USTAR with mtime 0 and no owner, so the same documents always give the same bytes.

`manifest.json` (written last) records, per split, every shard's name, samples, tokens, size and sha256, plus
the tokenizer identity, the dtype and the command: a reader knows where every token is without opening a shard.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tarfile

import numpy as np

FORMAT = "pretrain-shards-v1"
MANIFEST = "manifest.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
MEMBER_EXT = {"uint16": "tokens.u16", "uint32": "tokens.u32"}
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)


REWRITE_ADVICE = ("Re-run `python -m data.prepare` with the same arguments to rewrite bad shards (complete ones are "
                  "kept), or set data.on_error=skip to train without it")


class ShardError(ValueError):
    """A shard that cannot be read as its manifest describes; names the shard and the byte offset."""

    def __init__(self, shard: str, offset: int | None, problem: str, *, advice: str = REWRITE_ADVICE):
        where = f"{shard}" + (f" at byte {offset}" if offset is not None else "")
        super().__init__(f"{where}: {problem}. {advice}")
        self.shard, self.offset = shard, offset


def token_dtype(vocab_size: int) -> str:
    """Smallest dtype name in DTYPES that holds every id below `vocab_size`."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------------- write


class ShardWriter:
    """Writes one shard to a hidden temp file beside its destination, hashing as it goes; `close` publishes it."""

    def __init__(self, out_dir: str, name: str, dtype: str):
        self.path = os.path.join(out_dir, name)
        self.name, self.dtype, self.ext = name, DTYPES[dtype], MEMBER_EXT[dtype]
        self.tmp = os.path.join(out_dir, f".{name}.{os.getpid()}.tmp")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.samples = self.tokens = self.bytes = 0

    def _write(self, raw: bytes):
        self.f.write(raw)
        self.sha.update(raw)
        self.bytes += len(raw)

    def add(self, key: int, ids: np.ndarray):
        raw = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        info = tarfile.TarInfo(f"{key:010d}.{self.ext}")
        info.size, info.mode, info.mtime = len(raw), 0o644, 0
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self._write(raw + bytes(-len(raw) % BLOCK))
        self.samples += 1
        self.tokens += len(ids)

    def close(self) -> dict:
        """End the archive as tar does (two zero blocks, padded to a 10 KiB record), publish, return its entry."""
        self._write(bytes(2 * BLOCK))
        self._write(bytes(-self.bytes % tarfile.RECORDSIZE))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"name": self.name, "samples": self.samples, "tokens": self.tokens, "bytes": self.bytes,
                "sha256": self.sha.hexdigest()}

    def discard(self):
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_json_atomic(path: str, obj: dict):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shards(out_dir: str, splits: dict, tokenizer_identity: dict, *, shard_size: int = 1 << 28,
                 **extra) -> dict:
    """Write already-tokenized documents ({split: iterable of id arrays, EOS included}) as shards + manifest.

    For tests and converters; `python -m data.prepare` is the way from text.
    """
    os.makedirs(out_dir, exist_ok=True)
    dtype = token_dtype(tokenizer_identity["vocab_size"])
    manifest = new_manifest(tokenizer_identity, dtype, **extra)
    for split, docs in splits.items():
        shards, writer, key = [], None, 0
        for ids in docs:
            if writer is None:
                writer = ShardWriter(out_dir, shard_name(split, len(shards)), dtype)
            writer.add(key, np.asarray(ids))
            key += 1
            if writer.bytes >= shard_size:
                shards.append(writer.close())
                writer = None
        if writer is not None:
            shards.append(writer.close())
        manifest["splits"][split] = split_entry(shards)
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def new_manifest(tokenizer_identity: dict, dtype: str, **extra) -> dict:
    return {"format": FORMAT, "tokenizer": tokenizer_identity, "dtype": dtype, "member": MEMBER_EXT[dtype],
            "splits": {}, **extra}


def split_entry(shards: list[dict]) -> dict:
    return {"documents": sum(s["samples"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
            "shards": shards}


# ---------------------------------------------------------------------------------------------------- read


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


class Manifest:
    """A parsed manifest.json plus where its shards live: a local directory or a URL prefix webdataset opens."""

    def __init__(self, path: str):
        path = str(path)
        self.where = path
        if is_url(path):
            # Shards sit beside the manifest: replace the last 'manifest.json' in the URL (or pipe command).
            if MANIFEST not in path:
                raise ValueError(f"data URL {path!r} must name the manifest (…/{MANIFEST}); shard URLs are made by "
                                 f"replacing '{MANIFEST}' with each shard's name")
            self._url_head, self._url_tail = path.rsplit(MANIFEST, 1)
            self.local_dir = None
            raw = _read_url(path)
        else:
            manifest_path = os.path.join(path, MANIFEST) if os.path.isdir(path) else path
            self.local_dir = os.path.dirname(os.path.abspath(manifest_path))
            if not os.path.isfile(manifest_path):
                hint = (" (it holds meta.json of the old flat-token format; the streaming loader needs shards)"
                        if os.path.isfile(os.path.join(path, "meta.json")) else "")
                raise FileNotFoundError(
                    f"{manifest_path} not found{hint}: {path!r} is not a prepared shard directory, or its prepare "
                    f"was interrupted; create it with `python -m data.prepare --input ... --output {path}`")
            with open(manifest_path, "rb") as f:
                raw = f.read()
        try:
            self.data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: manifest is not valid JSON ({e}); re-run `python -m data.prepare`") from e
        if self.data.get("format") != FORMAT:
            raise ValueError(f"{path}: manifest format {self.data.get('format')!r}, expected {FORMAT!r}; "
                             "re-run `python -m data.prepare`")
        self.dtype = DTYPES[self.data["dtype"]]
        self.member = self.data["member"]
        self.tokenizer = self.data["tokenizer"]
        self.sha256 = hashlib.sha256(raw).hexdigest()

    def shards(self, split: str) -> list[dict]:
        splits = self.data["splits"]
        if split not in splits:
            raise ValueError(f"{self.where} has no split {split!r}; it has {sorted(splits)}")
        return splits[split]["shards"]

    def url(self, name: str) -> str:
        if self.local_dir is not None:
            return os.path.join(self.local_dir, name)
        return f"{self._url_head}{name}{self._url_tail}"


def _read_url(url: str) -> bytes:
    from webdataset.gopen import gopen  # imports torch: only for URLs

    with gopen(url, "rb") as f:
        return f.read()


def check_size(manifest: Manifest, entry: dict) -> None:
    """Cheap check of a local shard before training: present and of the recorded size (URLs are not checked)."""
    if manifest.local_dir is None:
        return
    path = manifest.url(entry["name"])
    if not os.path.isfile(path):
        raise ShardError(path, None, "missing, but the manifest lists it")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ShardError(path, min(size, entry["bytes"]),
                         f"{size} bytes on disk but the manifest records {entry['bytes']} (truncated or rewritten)")


class Shard:
    """One opened shard: its bytes (memory-mapped when local) and the offset and length of every document."""

    def __init__(self, manifest: Manifest, entry: dict, *, verify: bool = True, index=None,
                 vocab_size: int | None = None):
        """`index`: (offsets, lengths) from an earlier opening of this shard, to skip parsing and checking.
        `vocab_size`: embedding rows of the model that reads it (model.vocab_size); every token id must be below it
        and below the manifest's vocabulary."""
        self.name = manifest.url(entry["name"])
        if manifest.local_dir is not None:
            check_size(manifest, entry)
            with open(self.name, "rb") as f:
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if entry["bytes"] else b""
        else:
            try:
                self.buf = _read_url(self.name)
            except Exception as e:
                raise ShardError(self.name, None, f"could not be read ({e})") from e
        self.dtype = manifest.dtype
        self.data = np.frombuffer(self.buf, np.uint8)
        if index is not None:
            self.offsets, self.lengths = index
            return
        self.offsets, self.lengths = index_tar(self.buf, self.name, manifest.member, self.dtype.itemsize)
        if len(self.buf) != entry["bytes"]:
            raise ShardError(self.name, min(len(self.buf), entry["bytes"]),
                             f"{len(self.buf)} bytes read but the manifest records {entry['bytes']} (truncated or "
                             "rewritten)")
        if len(self.lengths) != entry["samples"] or int(self.lengths.sum()) != entry["tokens"]:
            raise ShardError(self.name, None, f"holds {len(self.lengths)} documents / {int(self.lengths.sum())} "
                                              f"tokens but the manifest records {entry['samples']} / {entry['tokens']}")
        if verify and hashlib.sha256(self.buf).hexdigest() != entry["sha256"]:
            raise ShardError(self.name, None, "sha256 differs from the manifest (the file is corrupt or was "
                                              "rewritten after the manifest)")
        self._check_ids(manifest.tokenizer["vocab_size"], vocab_size)

    def _check_ids(self, data_vocab: int, model_vocab: int | None) -> None:
        """Raise if a token id is not below both vocabularies: an embedding lookup would fail or read another row.

        One vectorised pass: the maximum of every whole 512-byte block with the header blocks left out (tar pads
        data with zeros). Only if that finds an id too large are documents searched one by one, to name it."""
        limit = data_vocab if model_vocab is None else min(data_vocab, model_vocab)
        blocks = len(self.data) // BLOCK
        block_max = self.data[:blocks * BLOCK].view(self.dtype).reshape(blocks, BLOCK // self.dtype.itemsize).max(
            1, initial=0)
        block_max[(self.offsets - BLOCK) // BLOCK] = 0
        if int(block_max.max(initial=0)) < limit:
            return
        for doc, length in enumerate(self.lengths):
            ids = self.tokens(doc, 0, int(length))
            if len(ids) and int(ids.max()) >= limit:
                header = int(self.offsets[doc]) - BLOCK
                member = bytes(self.data[header:header + 100]).rstrip(b"\0").decode(errors="replace")
                if model_vocab is not None and model_vocab < data_vocab:
                    beyond = f"beyond model.vocab_size={model_vocab} (its manifest's tokenizer has {data_vocab} ids)"
                    advice = (f"Set model.vocab_size to at least {data_vocab}, the data's vocabulary, or "
                              "data.on_error=skip to train without this shard")
                else:
                    beyond = f"beyond the {data_vocab}-token vocabulary of its manifest" + (
                        f" (model.vocab_size={model_vocab})" if model_vocab is not None else "")
                    advice = ("The shard does not hold what its manifest says (written with another tokenizer, or "
                              "corrupt): prepare it again with the tokenizer the manifest names, or set "
                              "data.on_error=skip to train without it")
                raise ShardError(self.name, header, f"document {doc} (member {member}) holds token id "
                                 f"{int(ids.max())}, {beyond}", advice=advice)

    def tokens(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of document `doc` (tar order), a view into the shard."""
        o = self.offsets[doc]
        return self.data[o + start * self.dtype.itemsize:o + stop * self.dtype.itemsize].view(self.dtype)


def _octal(field: bytes, shard: str, offset: int, what: str) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardError(shard, offset, f"corrupt tar header (its {what} field is {field!r})") from None


def index_tar(buf, shard: str, member: str, itemsize: int) -> tuple[np.ndarray, np.ndarray]:
    """(data offsets, token counts) of the `*.{member}` members of a tar held in `buf`, checking every header."""
    n = len(buf)
    headers, offsets, sizes = [], [], []
    pos = 0
    suffix = ("." + member).encode()
    while True:
        if pos + BLOCK > n:
            raise ShardError(shard, pos, f"truncated: the file ends ({n} bytes) where a tar header or the end-of-"
                                         "archive marker should be")
        header = buf[pos:pos + BLOCK]
        if header == _ZERO_BLOCK:
            break
        size = _octal(header[124:136], shard, pos, "size")
        kind = header[156:157]
        end = pos + BLOCK + size
        if end > n:
            raise ShardError(shard, pos, f"truncated: member {header[:100].rstrip(bytes(1))!r} declares {size} "
                                         f"bytes but the file ends at byte {n}")
        if kind in (b"0", b"\0"):
            name = header[:100].rstrip(b"\0")
            if not name.endswith(suffix) or size % itemsize:
                raise ShardError(shard, pos, f"unexpected member {name!r} of {size} bytes (expected *.{member})")
            headers.append(pos)
            offsets.append(pos + BLOCK)
            sizes.append(size)
        elif kind not in (b"x", b"g", b"L", b"K", b"5"):  # pax / GNU long-name headers and directories carry no sample
            raise ShardError(shard, pos, f"unexpected tar entry type {kind!r}")
        pos = end + (-size % BLOCK)
    _check_header_sums(buf, np.asarray(headers, np.int64), shard)
    return np.asarray(offsets, np.int64), np.asarray(sizes, np.int64) // itemsize


def _check_header_sums(buf, headers: np.ndarray, shard: str) -> None:
    """Tar header checksums of all members at once: the byte sum with the checksum field read as spaces."""
    if not len(headers):
        return
    data = np.frombuffer(buf, np.uint8)
    blocks = data[headers[:, None] + np.arange(BLOCK)]  # [members, 512]
    computed = blocks.sum(1, dtype=np.int64) - blocks[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
    for i in np.flatnonzero(computed != [_octal(bytes(b[148:156]), shard, int(h), "checksum")
                                         for b, h in zip(blocks, headers)])[:1]:
        raise ShardError(shard, int(headers[i]), "corrupt tar header (checksum mismatch)")
